"""Finding an OME image's label images without holding up its first frame.

An OME-Zarr image may have a ``labels/`` group listing label images (OME-Zarr 0.4: its
``labels`` attribute; 0.5: ``ome.labels``). Reading that is two round trips at least
(the group, then the listed images), which over a remote link is time the first image
should not wait for: a :class:`LabelSearch` reads them on zarr's event loop (no thread
of ours) while the viewer asks for its first chunks, in two round trips whatever the
number of label images (they are read at once). Its result is asked for when needed
(the label names, the ``k`` key, the HUD).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any

import zarr
import zarr.api.asynchronous

from chunkpool import MultiscaleInfo
from chunkpool.zarr_compat import zarr_loop

__all__ = ["LABELS_TIMEOUT", "LabelSearch"]

logger = logging.getLogger("zarrscope")

#: How long :meth:`LabelSearch.result` waits at most (each read is bounded by the
#: store's retry policy already; this bounds the wait for all of them).
LABELS_TIMEOUT = 60.0


class LabelSearch:
    """The label images an OME image's ``labels/`` group lists, being read (started
    here); none for other images. A listed name that is missing or not a group is
    skipped, with a warning; a ``labels/`` group that cannot be read gives none, with a
    warning: the image itself still shows."""

    def __init__(self, info: MultiscaleInfo):
        self._source = info.source
        self._future: concurrent.futures.Future[list[zarr.Group]] | None = None
        if info.ome_version is not None:
            self._future = asyncio.run_coroutine_threadsafe(_label_groups(info), zarr_loop())

    def done(self) -> bool:
        """Whether the search has ended (its result is there without waiting)."""
        return self._future is None or self._future.done()

    def result(self, timeout: float = LABELS_TIMEOUT) -> list[zarr.Group]:
        """The label images found, waiting for the search at most ``timeout`` s (then
        none, with a warning)."""
        if self._future is None:
            return []
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            logger.warning(
                "%s: its labels/ group took over %.0f s: none shown", self._source, timeout
            )
        except concurrent.futures.CancelledError:
            pass
        self.cancel()
        return []

    def cancel(self) -> None:
        """Stop the search (its reads cancelled); its result is then none."""
        if self._future is not None:
            self._future.cancel()
            self._future = None


async def _label_groups(info: MultiscaleInfo) -> list[zarr.Group]:
    array = info.levels[0].array
    path = f"{info.path}/labels" if info.path else "labels"
    try:  # the format is known: no probing for the other one
        group = await zarr.api.asynchronous.open_group(
            store=array.store, path=path, mode="r", zarr_format=array.metadata.zarr_format
        )
        attrs = group.attrs
        names = attrs.get("ome", attrs).get("labels", [])
    except FileNotFoundError:  # no labels/ group: nothing to say
        return []
    except Exception as err:  # metadata read failure: no labels, the image still shows
        logger.warning("%s: cannot read its labels/ group (%s)", info.source, type(err).__name__)
        return []
    names = [str(name) for name in names] if isinstance(names, list) else []

    async def one(name: str) -> Any:
        try:
            return await group.getitem(name)
        except Exception:
            return None

    found = []
    for name, node in zip(names, await asyncio.gather(*map(one, names)), strict=True):
        if isinstance(node, zarr.AsyncGroup):
            found.append(zarr.Group(node))
        else:
            logger.warning("%s: labels/%s is listed but is not a group", info.source, name)
    return found
