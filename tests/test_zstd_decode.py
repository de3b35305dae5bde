"""zstd chunks decode through libzstd (a reused context per thread), with exactly the
verdicts of the numcodecs path it replaces: every frame of the right total size is
the chunk, anything else is a ChunkDecodeError naming the expected size, and a
recycled buffer's old bytes never come back (ISSUE7 §1a, §5)."""

from __future__ import annotations

import threading

import numcodecs
import numcodecs.zstd
import numpy as np
import pytest
from support.corrupt import zstd_frame_without_size

from chunkpool import ChunkDecodeError, frames
from chunkpool.buffers import BufferPool

NBYTES = 512
CHUNK = np.arange(NBYTES, dtype=np.uint8).tobytes()
ZSTD = numcodecs.Zstd()


def _encode(payload: bytes) -> bytes:
    return bytes(ZSTD.encode(payload))


VALID = {
    "one frame": _encode(CHUNK),
    "two frames": _encode(CHUNK[:200]) + _encode(CHUNK[200:]),
    "frame without size": zstd_frame_without_size(CHUNK),
}
INVALID = {
    "short": _encode(CHUNK[:256]),
    "long": _encode(CHUNK + CHUNK),
    "short without size": zstd_frame_without_size(CHUNK[:256]),
    "long without size": zstd_frame_without_size(CHUNK + b"xx"),
    "two frames, short": _encode(CHUNK[:200]) + _encode(CHUNK[200:300]),
    "cut": _encode(CHUNK)[:-3],
    "garbage": b"not a zstd frame at all",
    "empty": b"",
}


@pytest.fixture(params=["libzstd", "libzstd of numcodecs", "numcodecs"])
def path(request, monkeypatch):
    """Each decode path: libzstd (the default where it loads; the system's, or the
    copy in numcodecs' extension where the system has none), numcodecs without it."""
    if request.param == "numcodecs":
        monkeypatch.setattr(frames, "_LIBZSTD", None)
        return request.param
    assert frames._LIBZSTD is not None, "libzstd did not load (cffi and libzstd are deps)"
    if request.param == "libzstd of numcodecs":
        ffi = frames._LIBZSTD[0]
        monkeypatch.setattr(frames, "_LIBZSTD", (ffi, ffi.dlopen(numcodecs.zstd.__file__)))
    monkeypatch.setattr(frames, "_THREAD", threading.local())  # (contexts of that library)

    def refuse(*args):  # the libzstd path must not fall back to numcodecs
        raise AssertionError("numcodecs decompress called on the libzstd path")

    monkeypatch.setattr(frames, "_zstd_decompress", refuse)
    return "libzstd"


def _dirty_pool() -> BufferPool:
    """A buffer pool whose next buffer of NBYTES holds other bytes (0xAB)."""
    buffers = BufferPool()
    stale = buffers.take(NBYTES)
    stale[:] = 0xAB
    buffers.give(stale)
    return buffers


@pytest.mark.parametrize("name", list(VALID))
def test_valid_frames_decode_to_the_chunk(path, name):
    buffers = _dirty_pool()
    data = np.frombuffer(VALID[name], np.uint8)
    out, recycled = frames.decode_zstd(ZSTD, data, NBYTES, buffers)
    assert recycled
    assert out.tobytes() == CHUNK


@pytest.mark.parametrize("name", list(INVALID))
def test_frames_of_another_size_fail(path, name):
    buffers = _dirty_pool()
    data = np.frombuffer(INVALID[name], np.uint8)
    # (numcodecs' own errors are RuntimeErrors, which the source names as a
    # ChunkDecodeError; libzstd's path raises that itself)
    with pytest.raises(ChunkDecodeError if path == "libzstd" else Exception) as info:
        frames.decode_zstd(ZSTD, data, NBYTES, buffers)
    if path == "libzstd" and name in ("short", "long", "short without size", "two frames, short"):
        assert f"expected {NBYTES}" in str(info.value), str(info.value)
    assert buffers.free_bytes >= NBYTES  # the buffer taken went back


def test_each_thread_decodes_with_its_own_context():
    """Threads decoding at once each use a context of their own (a shared one would
    mix their frames up)."""
    assert frames._LIBZSTD is not None
    payloads = [np.full(NBYTES, k, np.uint8).tobytes() for k in range(4)]
    blobs = [np.frombuffer(_encode(p), np.uint8) for p in payloads]
    buffers = BufferPool()
    wrong: list[int] = []
    start = threading.Barrier(len(blobs))

    def work(k: int) -> None:
        start.wait(timeout=30)
        for _ in range(300):
            out, _ = frames.decode_zstd(ZSTD, blobs[k], NBYTES, buffers)
            if out.tobytes() != payloads[k]:
                wrong.append(k)
            buffers.give(out)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(blobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert not wrong
