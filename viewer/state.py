"""ViewState: what a viewer shows, as an evented, serialisable model.

The state is plain data: the camera rectangle, the slice position by axis name, the
active layer and channel, the HUD's visibility, and per layer its source and display
settings (name, kind, visibility, opacity, blending; an image's channels with
colormap, window and visibility, or its true-colour mode; a labels layer's outline mode
and selected ID). The viewer keeps :attr:`Viewer.state` current (each field is a psygnal
signal: ``state.events.position.connect(...)``, how the Qt sliders follow the keys),
:meth:`ViewState.to_json` writes it, and :meth:`Viewer.from_state` rebuilds the same
view from it: same layers, settings and camera, so the same pixels.

Sources are saved without credentials (:func:`chunkpool.redaction.redact`): a state
saved from a source that carried them names it without them, and opening it again
needs them given another way (environment, ``storage_options``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from psygnal import evented

__all__ = ["STATE_VERSION", "LayerState", "ViewState"]

#: Bumped when the format changes incompatibly.
STATE_VERSION = 1


@dataclass
class LayerState:
    """One layer's source and display settings."""

    source: str
    kind: str = "image"  # "image" or "labels"
    name: str = ""
    visible: bool = True
    opacity: float = 1.0
    blending: str = "additive"
    #: Image: per channel {"index", "label", "colormap", "clim", "visible"}.
    channels: list[dict[str, Any]] = field(default_factory=list)
    rgb: bool = False
    #: Labels: outline only, and the selected ID (None: none).
    outline: bool = False
    selected: int | None = None


@evented
@dataclass
class ViewState:
    """The whole view (see the module's docstring)."""

    camera: dict[str, float] = field(default_factory=dict)  # x, y, width, height
    position: dict[str, int] = field(default_factory=dict)  # axis name -> level-0 index
    layers: list[LayerState] = field(default_factory=list)
    active_layer: int = 0
    active_channel: int = 0
    show_hud: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViewState:
        """The state in ``data`` (as :meth:`to_dict` writes it); ValueError if it is not
        one."""
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError(f"not a zarrscope view state (version {STATE_VERSION})")
        try:
            layers = [LayerState(**layer) for layer in data["layers"]]
            return cls(
                camera={k: float(v) for k, v in data["camera"].items()},
                position={str(k): int(v) for k, v in data["position"].items()},
                layers=layers,
                active_layer=int(data.get("active_layer", 0)),
                active_channel=int(data.get("active_channel", 0)),
                show_hud=bool(data.get("show_hud", True)),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"not a valid zarrscope view state: {err}") from None

    @classmethod
    def from_json(cls, text: str) -> ViewState:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not a zarrscope view state: {err}") from None
        return cls.from_dict(data)
