"""Local stores: what is read stays inside the store's directory.

A local store is a directory tree, and a symbolic link in it may point anywhere on the
machine: a level linked to ``/home/someone/other.zarr/0``, a chunk file linked to
``/etc/shadow``. chunkpool never follows a link out of the store's root (both resolved):

- at open, every level's directory and metadata document must resolve inside the root
  (:mod:`chunkpool.metadata` raises a :class:`~chunkpool.errors.SourceError`);
- per chunk, the directory holding the chunk file is resolved once (then remembered),
  and the file itself is opened with ``O_NOFOLLOW``, so the common case (no link)
  costs no extra system call. A chunk behind a link out of the root fails with a
  :class:`~chunkpool.errors.ChunkReadError` (:mod:`chunkpool.source`).

Links that stay inside the root are followed: deduplicated chunk files, or one level
linked to another array of the same store, read the same bytes as a copy would.
Messages name the link by its path inside the store, never its target.

The store is taken as it is while it is open: a directory replaced by a link after it
was checked is not noticed (whoever can change the store can change its data anyway).
"""

from __future__ import annotations

import os

__all__ = ["LinkEscapeError", "StoreRoot"]


class LinkEscapeError(OSError):
    """A path of a local store leads out of the store's root (through a symbolic link
    or a ``..`` component)."""


class StoreRoot:
    """The root directory of a local store, and the check that a key stays inside it."""

    def __init__(self, root: str | os.PathLike[str]):
        self.path = os.fspath(root)
        self.real = os.path.realpath(self.path)
        self._prefix = os.path.join(self.real, "")  # with a trailing separator

    def contains(self, real_path: str) -> bool:
        """Whether a resolved path is the root or lies under it."""
        return real_path == self.real or real_path.startswith(self._prefix)

    def check(self, key: str) -> None:
        """Raise :class:`LinkEscapeError` if ``key`` (a path relative to the root, "/"
        separated) resolves outside the root. Resolves every component: call it once
        per directory, not per chunk."""
        if not self.contains(os.path.realpath(os.path.join(self.path, key))):
            link = self._escaping_link(key)
            if link is None:
                raise LinkEscapeError(f"{key!r} leads out of the store; not followed")
            raise LinkEscapeError(f"{link!r} is a symbolic link out of the store; not followed")

    def _escaping_link(self, key: str) -> str | None:
        """The first leading part of ``key`` that is a link resolving outside the root."""
        parts = [part for part in key.split("/") if part]
        for end in range(1, len(parts) + 1):
            part = "/".join(parts[:end])
            path = os.path.join(self.path, part)
            if os.path.islink(path) and not self.contains(os.path.realpath(path)):
                return part
        return None
