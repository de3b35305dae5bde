"""A Qt window for the viewer: the canvas, and a slider for every z / t / ... axis.

Used by ``zarrscope`` when a Qt binding (PySide6, PyQt6, PySide2 or PyQt5) is
installed; importing this module raises ImportError otherwise, and the viewer opens a
plain glfw window where z and t are stepped with keys only.
"""

from __future__ import annotations

import importlib
from typing import Any

QT_LIBS = ("PySide6", "PyQt6", "PySide2", "PyQt5")


def _import_qt() -> str:
    """Import the first installed Qt binding (rendercanvas.qt uses the imported one)."""
    for name in QT_LIBS:
        try:
            importlib.import_module(f"{name}.QtWidgets")
        except ImportError:
            continue
        return name
    raise ImportError(f"no Qt binding installed (tried {', '.join(QT_LIBS)})")


QT_LIB = _import_qt()

from rendercanvas.qt import QRenderWidget, QtCore, QtWidgets, loop  # noqa: E402

from .app import Viewer  # noqa: E402

__all__ = ["QT_LIB", "ViewerWindow", "loop"]


class ViewerWindow(QtWidgets.QWidget):
    """The viewer's canvas above one labelled slider per slider axis (z, t, ...)."""

    def __init__(self, source: Any, size: tuple[int, int], title: str, **options: Any):
        if QtWidgets.QApplication.instance() is None:
            QtWidgets.QApplication([])  # rendercanvas's Qt loop runs this application
        super().__init__()
        self.setWindowTitle(title)
        self.resize(*size)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.canvas = QRenderWidget(self, update_mode="ondemand")
        layout.addWidget(self.canvas, 1)
        self.viewer = Viewer(source, self.canvas, size=size, **options)
        scale = self.viewer.pool.multiscale_info.levels[0]
        self.sliders: dict[int, tuple[Any, Any]] = {}
        for axis, index in self.viewer.layer.position:
            if scale.shape[axis] < 2:
                continue
            row = QtWidgets.QHBoxLayout()
            row.setContentsMargins(8, 2, 8, 2)
            label = QtWidgets.QLabel()
            slider = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
            slider.setRange(0, scale.shape[axis] - 1)
            slider.setValue(index)
            slider.valueChanged.connect(lambda value, axis=axis: self.viewer.set_index(axis, value))
            row.addWidget(label)
            row.addWidget(slider, 1)
            layout.addLayout(row)
            self.sliders[axis] = (label, slider)
        self.viewer.position_listeners.append(self._sync)
        self._sync(self.viewer.layer.position)

    def _sync(self, position: tuple[tuple[int, int], ...]) -> None:
        """Show the viewer's slice position on the sliders (keys move it too)."""
        axes = self.viewer.pool.multiscale_info.levels[0].axes
        for axis, index in position:
            if axis in self.sliders:
                label, slider = self.sliders[axis]
                label.setText(f"{axes[axis].name} {index}")
                if slider.value() != index:
                    slider.blockSignals(True)
                    slider.setValue(index)
                    slider.blockSignals(False)

    def closeEvent(self, event: Any) -> None:
        """Closing the window closes the viewer (its pool's threads stop)."""
        self.viewer.close()
        super().closeEvent(event)
