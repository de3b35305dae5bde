"""The viewer's key bindings: one table, read by the key handler and the help overlay.

Each binding names its keys (rendercanvas key names; letters match either case), says
what it does in a few words (shown by ``?``), and acts on the viewer through its public
methods only, so the table is the whole keyboard interface.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["BINDINGS", "Binding", "action_for", "help_lines"]


@dataclass(frozen=True)
class Binding:
    """``keys`` do ``action(viewer, key)``; ``help`` says what, in a few words."""

    keys: tuple[str, ...]
    help: str
    action: Callable[[Any, str], None]


_PANS: dict[str, tuple[float, float]] = {
    "ArrowLeft": (-0.1, 0),
    "ArrowRight": (0.1, 0),
    "ArrowUp": (0, -0.1),
    "ArrowDown": (0, 0.1),
}

BINDINGS: tuple[Binding, ...] = (
    Binding(tuple(_PANS), "pan", lambda v, k: v.pan(*_PANS[k])),
    Binding(("=", "+"), "zoom in", lambda v, k: v.zoom(1.25)),
    Binding(("-",), "zoom out", lambda v, k: v.zoom(0.8)),
    Binding(("0", "r"), "fit the image", lambda v, k: v.fit()),
    Binding(("PageUp",), "z - 1", lambda v, k: v.step_axis("z", -1)),
    Binding(("PageDown",), "z + 1", lambda v, k: v.step_axis("z", 1)),
    Binding((" ",), "play / stop t (else z)", lambda v, k: v.toggle_play()),
    Binding((",",), "t - 1", lambda v, k: v.step_axis("t", -1)),
    Binding((".",), "t + 1", lambda v, k: v.step_axis("t", 1)),
    Binding(
        tuple("123456789"),
        "show / hide channel N of the active layer",
        lambda v, k: v.toggle_channel(int(k) - 1),
    ),
    Binding(("c",), "next channel to adjust", lambda v, k: v.cycle_active_channel()),
    Binding(("l",), "next active layer", lambda v, k: v.cycle_active_layer()),
    Binding(("v",), "show / hide the active layer", lambda v, k: v.toggle_active_layer()),
    Binding(("[",), "narrow the contrast window", lambda v, k: v.adjust_window(scale=0.8)),
    Binding(("]",), "widen the contrast window", lambda v, k: v.adjust_window(scale=1.25)),
    Binding((";",), "move the window down", lambda v, k: v.adjust_window(shift=-0.1)),
    Binding(("'",), "move the window up", lambda v, k: v.adjust_window(shift=0.1)),
    Binding(("a",), "auto-contrast on the view", lambda v, k: v.auto_contrast()),
    Binding(("k",), "show the image's next label image", lambda v, k: v.show_next_labels()),
    Binding(("o",), "labels: outline only / filled", lambda v, k: v.toggle_outline()),
    Binding(("s",), "save the view state", lambda v, k: v.save_state()),
    Binding(("b",), "show / hide the active channel's colorbar", lambda v, k: v.toggle_colorbar()),
    Binding(("h",), "show / hide the heads-up display", lambda v, k: v.toggle_hud()),
    Binding(("?",), "show / hide this help", lambda v, k: v.toggle_help()),
    Binding(("q", "Escape"), "quit", lambda v, k: v.close()),
)

_BY_KEY: dict[str, Binding] = {key: b for b in BINDINGS for key in b.keys}


def action_for(key: str) -> Callable[[Any], None] | None:
    """What ``key`` does to a viewer (None: nothing)."""
    binding = _BY_KEY.get(key)
    if binding is None:
        key = key.lower()
        binding = _BY_KEY.get(key)
    if binding is None:
        return None
    return lambda viewer: binding.action(viewer, key)


def help_lines() -> list[str]:
    """The table as text, a line a binding."""
    names = {"ArrowLeft": "←", "ArrowRight": "→", "ArrowUp": "↑", "ArrowDown": "↓", " ": "space"}
    lines = []
    for b in BINDINGS:
        keys = "1-9" if b.keys == tuple("123456789") else " ".join(names.get(k, k) for k in b.keys)
        lines.append(f"{keys}:  {b.help}")
    return lines
