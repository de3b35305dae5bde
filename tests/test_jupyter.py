"""The viewer in a notebook: ``Viewer(source, "jupyter")`` in a headless kernel (nbclient)
builds, settles and screenshots the same pixels as the offscreen viewer."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from support.images import noise_image, write_pyramid

from viewer import Viewer

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.render

CELL = """
import numpy as np
from viewer import Viewer
viewer = Viewer({source!r}, "jupyter", size=(160, 96), colormap="gray", clim=(0, 255),
                show_hud=False)
# what the notebook's front end sends once the widget is shown (there is none here)
viewer.canvas.handle_event({{"event_type": "resize", "width": 160, "height": 96,
                            "pixel_ratio": 1.0}})
viewer.show_region(8, 4, 168, 100)
assert viewer.wait_settled(120)
np.save({out!r}, viewer.screenshot())
print(type(viewer.canvas).__module__)
viewer.close()
"""


def test_a_notebook_viewer_shows_what_the_offscreen_one_does(tmp_path: pathlib.Path) -> None:
    picture = noise_image((128, 192), seed=31)
    pyramid = write_pyramid(tmp_path / "nb.ome.zarr", picture, chunks=(32, 32), n_levels=2)
    out = tmp_path / "shot.npy"
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(CELL.format(source=str(pyramid.path), out=str(out)))
    ]
    nbclient.NotebookClient(notebook, timeout=180, kernel_name="python3").execute()
    printed = "".join(o.get("text", "") for o in notebook.cells[0].outputs)
    assert "rendercanvas.jupyter" in printed
    with Viewer(
        str(pyramid.path), None, size=(160, 96), colormap="gray", clim=(0, 255), show_hud=False
    ) as offscreen:
        offscreen.show_region(8, 4, 168, 100)
        assert offscreen.wait_settled(120)
        expected = offscreen.screenshot()
    shot = np.load(out)
    assert shot.shape == expected.shape and (shot == expected).all()
    assert (shot[..., 0] == picture[4:100, 8:168]).all()
