"""One GPU texture budget for every layer of every view on a device.

Each loaded tile that is drawn has a texture on the GPU. Textures of tiles that left
the view are kept (hidden) while the budget allows, since panning back is common, and
images taken out of the scene are kept as *spares* for the next tile of the same shape
(creating a texture and its GPU resources costs far more than refilling one). When the
bytes of all of them exceed the budget, spares go first, then the hidden textures of
every registered layer, least recently shown first (then farthest from their view's
focus); a texture on screen is never evicted, so a view whose visible tiles alone
exceed the budget goes over it rather than show holes.

pygfx renders every canvas of a process with one shared device, so by default all
viewers share :meth:`TextureBudget.shared`; a viewer given its own budget (an int)
keeps to that alone.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterable
from typing import ClassVar, Protocol

import pygfx as gfx

__all__ = ["DEFAULT_TEXTURE_BUDGET", "TextureBudget", "TextureUser"]

#: Bytes of GPU textures all viewers keep by default.
DEFAULT_TEXTURE_BUDGET = 512 << 20

#: An eviction candidate: (when last shown, -distance to the focus), and the call that
#: frees it.
Candidate = tuple[tuple[int, float], Callable[[], None]]


class TextureUser(Protocol):
    """A layer whose hidden textures may be evicted."""

    def eviction_candidates(self) -> Iterable[Candidate]: ...


class TextureBudget:
    """Counts the texture bytes of registered layers and keeps them within ``nbytes``."""

    _shared: ClassVar[TextureBudget | None] = None

    def __init__(self, nbytes: int = DEFAULT_TEXTURE_BUDGET):
        self.nbytes = int(nbytes)
        #: Bytes of textures of images in a scene (shown or hidden).
        self.scene_bytes = 0
        #: Bytes of spare images, kept for reuse.
        self.spare_bytes = 0
        #: The most ``scene_bytes + spare_bytes`` has been.
        self.peak_bytes = 0
        #: A frame counter shared by its users, so that "least recently shown" compares
        #: across layers and views.
        self.frame = 0
        self._spares: dict[tuple, list[tuple[gfx.Image, int]]] = {}
        self._users: weakref.WeakSet[TextureUser] = weakref.WeakSet()

    @classmethod
    def shared(cls) -> TextureBudget:
        """The process-wide budget (pygfx's one device), created on first use."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def __repr__(self) -> str:
        return (
            f"TextureBudget({self.nbytes} bytes: {self.scene_bytes} in scenes, "
            f"{self.spare_bytes} spare)"
        )

    def register(self, user: TextureUser) -> None:
        self._users.add(user)

    def unregister(self, user: TextureUser, owners: set[Hashable]) -> None:
        """Forget a layer, and the spares only it can use: those whose key starts with
        one of ``owners``."""
        self._users.discard(user)
        for key in [k for k in self._spares if k[0] in owners]:
            for _, nbytes in self._spares.pop(key):
                self.spare_bytes -= nbytes

    def take_spare(self, key: Hashable) -> gfx.Image | None:
        """A spare image for ``key`` (its texture to be refilled), counted in the scene."""
        spares = self._spares.get(key)
        if not spares:
            return None
        image, nbytes = spares.pop()
        self.spare_bytes -= nbytes
        self.scene_bytes += nbytes
        return image

    def added(self, nbytes: int) -> None:
        """A new texture went into a scene."""
        self.scene_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.scene_bytes + self.spare_bytes)

    def removed(self, key: Hashable, image: gfx.Image, nbytes: int) -> None:
        """An image left its scene: kept as a spare for ``key`` while the budget allows."""
        self.scene_bytes -= nbytes
        if self.scene_bytes + self.spare_bytes + nbytes <= self.nbytes:
            self._spares.setdefault(key, []).append((image, nbytes))
            self.spare_bytes += nbytes

    def enforce(self) -> None:
        """Let spares go, then hidden textures (least recently shown first), until within
        the budget or nothing hidden is left."""
        if self.scene_bytes + self.spare_bytes <= self.nbytes:
            return
        self._spares.clear()
        self.spare_bytes = 0
        if self.scene_bytes <= self.nbytes:
            return
        candidates = [c for user in list(self._users) for c in user.eviction_candidates()]
        for _, free in sorted(candidates, key=lambda c: c[0]):
            free()
            if self.scene_bytes <= self.nbytes:
                return
