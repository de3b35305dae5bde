"""The viewer's pure parts, without a GPU: the camera, the key table, the HUD's text,
the scale bar, value formatting and the view state's serialisation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from viewer import Camera, HudInfo, LayerState, TileStatus, ViewState, hud_lines
from viewer.hud import LayerSummary, format_value, scale_bar
from viewer.keys import BINDINGS, action_for, help_lines


def test_camera_zoom_keeps_the_point_under_the_cursor() -> None:
    cam = Camera(size=(200, 100))
    cam.fit(0, 0, 1000, 1000)
    assert cam.edges == (-500.0, 0.0, 1500.0, 1000.0)  # square pixels, centred
    around = cam.screen_to_world(30, 70)
    cam.zoom(4.0, around)
    assert cam.screen_to_world(30, 70) == pytest.approx(around)
    assert cam.width == 500 and cam.height == 250
    x, y = cam.world_to_screen(*around)
    assert (x, y) == pytest.approx((30, 70))


def test_camera_drag_and_resize() -> None:
    cam = Camera(size=(100, 100))
    cam.show_world(0, 0, 100, 100)
    before = cam.screen_to_world(10, 10)
    cam.pan_screen(5, -3)  # the world under the pointer follows it
    assert cam.screen_to_world(15, 7) == pytest.approx(before)
    cam.resize(200, 100)  # same scale, same centre
    assert (cam.width, cam.height) == (200, 100) and cam.x == pytest.approx(45)
    cam.pan(0.5, 0)
    assert cam.x == pytest.approx(145)


def test_the_key_table_drives_every_key_it_lists() -> None:
    calls: list[tuple] = []

    class Recorder:
        def __getattr__(self, name: str):
            return lambda *a, **k: calls.append((name, a, k))

    for binding in BINDINGS:
        for key in binding.keys:
            action = action_for(key)
            assert action is not None, key
            action(Recorder())
    names = {name for name, _, _ in calls}
    assert {"pan", "zoom", "fit", "step_axis", "toggle_channel", "close"} <= names
    assert ("toggle_channel", (4,), {}) in calls  # "5" toggles channel index 4
    assert action_for("Q") is not None and action_for("x") is None
    assert len(help_lines()) == len(BINDINGS)
    assert any(line.startswith("1-9") for line in help_lines())


def summary(name: str, status: TileStatus, *, active: bool = False, kind: str = "image"):
    return LayerSummary(name, kind, True, active, status, 4)


def test_hud_lines_sum_the_layers_and_list_them() -> None:
    info = HudInfo(
        layers=(
            summary("a", TileStatus(2, 10, 3, 1), active=True),
            summary("cells", TileStatus(1, 4, 0, 0), kind="labels"),
        ),
        zoom=0.25,
        position=(("z", 3),),
        cursor=(10.0, 20.5, 10.0, 20.5, "µm"),
        values=(("a Channel 0", np.uint64(2**60 + 1)), ("cells label", None)),
        channel=("DAPI", (100.0, 2500.5)),
        hidden_labels=("nuclei",),
    )
    lines = hud_lines(info)
    assert lines[0] == "level 2/3   zoom 25%"
    assert lines[1] == "tiles 14 loaded, 3 pending, 1 failed   loading…"
    assert "z=3" in lines and "> a [image]" in lines and "  cells [labels]" in lines
    assert "labels: nuclei   (k shows)" in lines
    assert "DAPI: window 100 – 2500.5" in lines
    assert lines[-1] == f"a Channel 0: {2**60 + 1}   cells label: —"
    overflow = HudInfo(layers=(summary("a", TileStatus(2, 0, 0, 0, 10**12), active=True),), zoom=1)
    assert hud_lines(overflow)[1] == "zoom in: 1e+12 tiles in view at the coarsest level"


def test_values_are_formatted_as_stored() -> None:
    assert format_value(np.uint64(2**64 - 1)) == str(2**64 - 1)
    assert format_value(np.int64(-(2**63))) == str(-(2**63))
    assert format_value(np.float64(0.1) + np.float64(0.2)) == "0.30000000000000004"
    assert format_value(np.float32(0.1)) == "0.1"
    assert format_value(np.float64(3.0)) == "3"
    assert format_value(np.float64(math.nan)) == "nan"


def test_the_scale_bar_is_a_round_length() -> None:
    px, label = scale_bar(0.37, "micrometer")
    assert label == "20 µm" and px == pytest.approx(20 / 0.37)
    for per_px in (1e-3, 0.7, 3.3, 5e4):
        px, _ = scale_bar(per_px, "nanometer")
        assert 40 <= px <= 120
    assert scale_bar(1.0, None) is None


def test_view_state_serialises_and_checks_what_it_reads() -> None:
    state = ViewState(
        camera={"x": 1.0, "y": 2.0, "width": 3.0, "height": 4.0},
        position={"z": 5},
        layers=[LayerState(source="/data/a.zarr", name="a"), LayerState("/l", kind="labels")],
    )
    changed: list[object] = []
    state.events.position.connect(changed.append)
    state.position = {"z": 6}
    assert changed == [{"z": 6}]
    again = ViewState.from_json(state.to_json())
    assert again.to_dict() == state.to_dict()
    for bad in ("[]", "{", '{"version": 1, "layers": [{"nope": 1}]}'):
        with pytest.raises(ValueError, match="view state"):
            ViewState.from_json(bad)
