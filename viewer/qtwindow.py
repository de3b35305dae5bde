"""A Qt window for the viewer: the canvas, a slider for every z / t / ... axis, a layer list.

Used by ``zarrscope`` when a Qt binding (PySide6, PyQt6, PySide2 or PyQt5) is
installed; importing this module raises ImportError otherwise, and the viewer opens a
plain glfw window where z and t are stepped with keys only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
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
    """The viewer's canvas above one labelled slider (with a play button) per slider
    axis (z, t, ...) and, with more than one layer, a list of the layers (tick:
    visible; selected: active).

    Sliders, buttons and the list never take the keyboard focus: keys always reach the
    canvas (a dragged slider that kept the focus would take ``q`` and PageDown)."""

    def __init__(self, make_viewer: Callable[[Any], Viewer], size: tuple[int, int], title: str):
        """``make_viewer(canvas)`` builds the viewer in the window's canvas."""
        if QtWidgets.QApplication.instance() is None:
            QtWidgets.QApplication([])  # rendercanvas's Qt loop runs this application
        super().__init__()
        self.setWindowTitle(title)
        self.resize(*size)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.canvas = QRenderWidget(self, update_mode="ondemand")
        layout.addWidget(self.canvas, 1)
        self.viewer = make_viewer(self.canvas)
        self.sliders: dict[str, tuple[Any, Any]] = {}
        self.play_buttons: dict[str, Any] = {}
        for name, n in self.viewer.dims().items():
            if n < 2:
                continue
            row = QtWidgets.QHBoxLayout()
            row.setContentsMargins(8, 2, 8, 2)
            label = QtWidgets.QLabel()
            slider = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
            slider.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
            slider.setRange(0, n - 1)
            slider.valueChanged.connect(lambda value, name=name: self.viewer.set_index(name, value))
            play = QtWidgets.QPushButton("play")
            play.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
            play.setCheckable(True)
            play.toggled.connect(lambda on, name=name: self._play(name, on))
            row.addWidget(play)
            row.addWidget(label)
            row.addWidget(slider, 1)
            self.play_buttons[name] = play
            layout.addLayout(row)
            self.sliders[name] = (label, slider)
        self.layer_list = QtWidgets.QListWidget()
        self.layer_list.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
        self.layer_list.setMaximumHeight(90)
        self.layer_list.itemChanged.connect(self._layer_item_changed)
        self.layer_list.currentRowChanged.connect(self._layer_selected)
        layout.addWidget(self.layer_list)
        self.viewer.state.events.position.connect(self._sync)
        self.viewer.state.events.layers.connect(self._sync_layers)
        self.viewer.state.events.active_layer.connect(self._sync_layers)
        self._sync(self.viewer.state.position)
        self._sync_layers()
        self.canvas.setFocus()

    def _sync(self, position: dict[str, int]) -> None:
        """Show the viewer's slice position on the sliders (keys move it too)."""
        for name, index in position.items():
            if name in self.sliders:
                label, slider = self.sliders[name]
                label.setText(f"{name} {index}")
                if slider.value() != index:
                    slider.blockSignals(True)
                    slider.setValue(index)
                    slider.blockSignals(False)

    def _play(self, name: str, on: bool) -> None:
        """A play button: play that axis (the others' buttons go up), or stop."""
        if on:
            for other, button in self.play_buttons.items():
                if other != name and button.isChecked():
                    button.blockSignals(True)
                    button.setChecked(False)
                    button.blockSignals(False)
            self.viewer.play(name)
        else:
            self.viewer.stop()

    def _sync_layers(self, *_: Any) -> None:
        """List the layers (shown only when there are several)."""
        checked, unchecked = QtCore.Qt.CheckState.Checked, QtCore.Qt.CheckState.Unchecked
        self.layer_list.blockSignals(True)
        self.layer_list.clear()
        for layer in self.viewer.layers:
            item = QtWidgets.QListWidgetItem(f"{layer.name}  [{layer.kind}]")
            item.setFlags(item.flags() | QtCore.Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(checked if layer.visible else unchecked)
            self.layer_list.addItem(item)
        self.layer_list.setCurrentRow(self.viewer.active_layer)
        self.layer_list.setVisible(len(self.viewer.layers) > 1)
        self.layer_list.blockSignals(False)

    def _layer_item_changed(self, item: Any) -> None:
        layer = self.viewer.layers[self.layer_list.row(item)]
        layer.visible = item.checkState() == QtCore.Qt.CheckState.Checked

    def _layer_selected(self, row: int) -> None:
        if 0 <= row < len(self.viewer.layers):
            self.viewer.active_layer = row
            self.viewer.canvas.request_draw()

    def closeEvent(self, event: Any) -> None:
        """Closing the window closes the viewer (its pools' threads stop)."""
        self.viewer.close()
        super().closeEvent(event)
