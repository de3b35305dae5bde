"""Decoding one compressed chunk into exactly the bytes the chunk needs, or failing.

numcodecs' ``decode(buf, out=...)`` fills *at most* ``out``: a valid frame that decodes
to fewer bytes leaves the rest of ``out`` as it was, which for a recycled buffer is
another chunk's data. So before decoding, each format's own header says how many bytes
the frame holds, and a frame of the wrong size fails with :class:`ChunkDecodeError`
without touching ``out`` (nor allocating anything for a huge declared chunk). What each
numcodecs codec checks by itself, and what is added here (numcodecs 0.16):

- **zstd**: decoded by libzstd itself (through cffi, ABI mode: the system's
  library, else the copy numcodecs' extension is linked with), one reused
  decompression context per thread, straight into ``out``: every frame is decoded and
  the byte count it returns must be the chunk's (a frame that would overflow ``out``
  is an error, one that fills it short too), so stale bytes never pass. The declared
  sizes are walked only to say what is wrong. Without libzstd, numcodecs decodes:
  it sums the content sizes the frames declare and refuses a total larger than
  ``out``, and a frame without a declared size must fill ``out`` exactly; a smaller
  declared total would decode silently short, so the first frame's header is read
  here (a few bytes), and only when it is not exactly the chunk are the frames walked
  block by block to add up their sizes.
- **blosc**: the 16-byte header declares the decoded and compressed sizes; blosc's
  decoder is never told the input's length and trusts the header, so a frame shorter
  than its header says is refused here (it would be read past its end).
- **lz4** (numcodecs' format): a 4-byte size prefix, which numcodecs checks against
  what decodes but not against ``out``.
- **zlib, gzip**: Python's zlib cannot decode into a given buffer, so these inflate to
  new memory, stopping one byte past the chunk's size (a small bomb cannot grow
  without bound), and the result is the chunk's memory: no copy.
- **raw bytes**: the byte count must match.

Each ``decode_*`` function takes the encoded bytes (uint8), the chunk's size in bytes
and the buffer pool, and returns ``(buffer, recycled)``: exactly ``nbytes`` bytes, in a
buffer taken from the pool (``recycled``) or in memory of its own.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from typing import Any

import numcodecs
import numpy as np
from numcodecs.zstd import decompress as _zstd_decompress

from .buffers import BufferPool
from .errors import ChunkDecodeError

__all__ = ["IntoDecode", "into_decoder", "wrong_size"]

#: ``decode(compressor, data, nbytes, buffers) -> (uint8 buffer of nbytes, recycled)``
IntoDecode = Callable[[Any, np.ndarray, int, BufferPool], tuple[np.ndarray, bool]]

_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE = 0x184D2A50  # ... to 0x184D2A5F: skippable frames (no content)
_BLOSC_HEADER = 16
_BLOSC_MEMCPYED = 0x02


def wrong_size(what: str, got: int, expected: int) -> ChunkDecodeError:
    """The error for ``what`` holding ``got`` bytes where the chunk has ``expected``."""
    return ChunkDecodeError(f"{what} {got} bytes, expected {expected}")


def _into(compressor: Any, data: np.ndarray, nbytes: int, buffers: BufferPool) -> np.ndarray:
    """``compressor.decode(data, out=buffer)`` into a recycled buffer of ``nbytes``."""
    out = buffers.take(nbytes)
    try:
        compressor.decode(data, out=out)
    except BaseException:
        buffers.give(out)
        raise
    return out


def decode_raw(
    compressor: None, data: np.ndarray, nbytes: int, buffers: BufferPool
) -> tuple[np.ndarray, bool]:
    """Uncompressed chunk bytes (copied: ``data`` may be a read buffer given back)."""
    if data.nbytes != nbytes:
        raise wrong_size("chunk has", data.nbytes, nbytes)
    out = buffers.take(nbytes)
    out[:] = data
    return out, True


def decode_zstd(
    compressor: Any, data: np.ndarray, nbytes: int, buffers: BufferPool
) -> tuple[np.ndarray, bool]:
    if _LIBZSTD is None:
        return _decode_zstd_numcodecs(data, nbytes, buffers)
    if not data.flags.c_contiguous:
        data = np.ascontiguousarray(data)
    # libzstd's one-shot decode into the recycled buffer, with this thread's reused
    # context (numcodecs makes a new one per call, about a fifth of a small chunk's
    # decode): every frame is decoded, and the count it returns must be the chunk's.
    out = buffers.take(nbytes)
    dctx = thread_dctx()
    ffi, lib = _LIBZSTD
    got = lib.ZSTD_decompressDCtx(
        dctx, ffi.from_buffer(out), nbytes, ffi.from_buffer(data), data.nbytes
    )
    if got != nbytes:
        buffers.give(out)
        raise _zstd_error(data, nbytes, got)
    return out, True


def _zstd_error(data: np.ndarray, nbytes: int, got: int) -> ChunkDecodeError:
    """Why ``data`` did not decode to exactly ``nbytes`` (libzstd returned ``got``)."""
    total = _zstd_total_size(data.tobytes())
    if total is not None and total != nbytes:
        return wrong_size("zstd frames declare", total, nbytes)
    ffi, lib = _LIBZSTD  # type: ignore[misc]
    if not lib.ZSTD_isError(got):
        return wrong_size("zstd frames decode to", got, nbytes)
    if lib.ZSTD_getErrorCode(got) == _ZSTD_ERROR_DST_SIZE_TOO_SMALL:
        return ChunkDecodeError(
            f"zstd frames decode to more than {nbytes} bytes, expected {nbytes}"
        )
    return ChunkDecodeError(f"zstd: {ffi.string(lib.ZSTD_getErrorName(got)).decode()}")


def _decode_zstd_numcodecs(
    data: np.ndarray, nbytes: int, buffers: BufferPool
) -> tuple[np.ndarray, bool]:
    """:func:`decode_zstd` without libzstd: the frames' declared sizes checked here first,
    then numcodecs' decompress."""
    first = _zstd_frame_size(data[:18].tobytes(), 0)  # (bytes: cheaper to parse)
    if first is None or first[0] not in (None, nbytes):
        total = _zstd_total_size(data.tobytes())
        if total is not None and total != nbytes:
            raise wrong_size("zstd frames declare", total, nbytes)
    # One frame of the right declared size, or frames of unknown size (which numcodecs
    # then requires to fill ``out`` exactly), or frames whose sizes add up. numcodecs'
    # own decompress, without Zstd.decode's argument coercion (~5 µs a chunk).
    out = buffers.take(nbytes)
    try:
        _zstd_decompress(data, out)
    except BaseException:
        buffers.give(out)
        raise
    return out, True


#: libzstd's decompression functions, declared for cffi (ABI mode: nothing to compile).
_ZSTD_CDEF = """
void *ZSTD_createDCtx(void);
size_t ZSTD_freeDCtx(void *dctx);
size_t ZSTD_decompressDCtx(void *dctx, void *dst, size_t dstCapacity,
                           const void *src, size_t srcSize);
unsigned ZSTD_isError(size_t code);
int ZSTD_getErrorCode(size_t code);
const char *ZSTD_getErrorName(size_t code);
"""
#: ZSTD_error_dstSize_tooSmall (zstd_errors.h, stable since zstd 1.3).
_ZSTD_ERROR_DST_SIZE_TOO_SMALL = 70


def _load_libzstd() -> tuple[Any, Any] | None:
    """``(ffi, lib)`` for libzstd, or None (then numcodecs decodes). The system's
    library, else the copy numcodecs' zstd extension is linked with (it exports
    libzstd's symbols)."""
    try:
        import cffi
    except ImportError:
        return None
    import ctypes.util

    import numcodecs.zstd

    ffi = cffi.FFI()
    ffi.cdef(_ZSTD_CDEF)
    names = (  # (find_library runs a program: only asked when the first is not there)
        lambda: "libzstd.so.1",
        lambda: ctypes.util.find_library("zstd"),
        lambda: numcodecs.zstd.__file__,
    )
    for get_name in names:
        name = get_name()
        if not name:
            continue
        try:
            lib = ffi.dlopen(name)
            lib.ZSTD_decompressDCtx, lib.ZSTD_getErrorCode  # noqa: B018  (all there?)
        except (OSError, AttributeError):
            continue
        return ffi, lib
    return None


_LIBZSTD = _load_libzstd()
#: Each thread's reused decompression context (freed with the thread's locals).
_THREAD = threading.local()


def thread_dctx() -> Any:
    """This thread's libzstd decompression context (made on its first use)."""
    try:
        return _THREAD.dctx
    except AttributeError:
        return _new_dctx()


def _new_dctx() -> Any:
    """This thread's libzstd decompression context, made now."""
    ffi, lib = _LIBZSTD  # type: ignore[misc]
    dctx = lib.ZSTD_createDCtx()
    if dctx == ffi.NULL:
        raise MemoryError("libzstd could not allocate a decompression context")
    _THREAD.dctx = dctx = ffi.gc(dctx, lib.ZSTD_freeDCtx)
    return dctx


def _zstd_frame_size(buf: Any, pos: int) -> tuple[int | None, int] | None:
    """``(declared content size or None, header length)`` of the zstd frame at
    ``pos``; None if no (non-skippable) zstd frame starts there."""
    head = bytes(buf[pos : pos + 18])
    if len(head) < 6 or int.from_bytes(head[:4], "little") != _ZSTD_MAGIC:
        return None
    fhd = head[4]
    single_segment = (fhd >> 5) & 1
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fhd >> 6]
    start = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[fhd & 3]
    if len(head) < start + fcs_size:
        return None
    if fcs_size == 0:
        return None, start
    size = int.from_bytes(head[start : start + fcs_size], "little")
    return size + 256 if fcs_size == 2 else size, start + fcs_size


def _zstd_total_size(buf: bytes) -> int | None:
    """The content size all frames in ``buf`` declare together, walking their blocks;
    None if a frame does not declare its size or the frames are malformed (numcodecs
    then decodes into ``out`` and requires it filled exactly, or fails)."""
    pos = total = 0
    while pos < len(buf):
        magic = int.from_bytes(buf[pos : pos + 4], "little")
        if magic & 0xFFFFFFF0 == _ZSTD_SKIPPABLE:
            pos += 8 + int.from_bytes(buf[pos + 4 : pos + 8], "little")
            continue
        frame = _zstd_frame_size(buf, pos)
        if frame is None or frame[0] is None:
            return None
        size, header = frame
        checksum = buf[pos + 4] & 0x04
        pos += header
        while True:  # blocks: 3-byte header (last flag, type, size), then the block
            if pos + 3 > len(buf):
                return None
            block = int.from_bytes(buf[pos : pos + 3], "little")
            kind = (block >> 1) & 3
            if kind == 3:
                return None
            pos += 3 + (1 if kind == 1 else block >> 3)
            if block & 1:
                break
        pos += 4 if checksum else 0
        total += size
    return total


def decode_blosc(
    compressor: Any, data: np.ndarray, nbytes: int, buffers: BufferPool
) -> tuple[np.ndarray, bool]:
    if data.nbytes < _BLOSC_HEADER:
        raise ChunkDecodeError(f"blosc frame of {data.nbytes} bytes is shorter than its header")
    head = data[:_BLOSC_HEADER].tobytes()
    declared = int.from_bytes(head[4:8], "little")
    compressed = int.from_bytes(head[12:16], "little")
    if compressed > data.nbytes:
        raise ChunkDecodeError(f"blosc frame of {compressed} bytes is cut at {data.nbytes}")
    if head[2] & _BLOSC_MEMCPYED and compressed < declared + _BLOSC_HEADER:
        raise ChunkDecodeError(f"blosc frame stores {declared} bytes in {compressed}")
    if declared != nbytes:
        raise wrong_size("blosc frame declares", declared, nbytes)
    return _into(compressor, data, nbytes, buffers), True


def decode_lz4(
    compressor: Any, data: np.ndarray, nbytes: int, buffers: BufferPool
) -> tuple[np.ndarray, bool]:
    if data.nbytes < 4:
        raise ChunkDecodeError(f"lz4 frame of {data.nbytes} bytes has no size prefix")
    declared = int.from_bytes(data[:4].tobytes(), "little")
    if declared != nbytes:
        raise wrong_size("lz4 frame declares", declared, nbytes)
    return _into(compressor, data, nbytes, buffers), True


def _inflate(data: np.ndarray, nbytes: int, wbits: int, multi_member: bool) -> bytes:
    """Inflate a zlib (or gzip, ``wbits`` 31) stream to at most ``nbytes + 1`` bytes.

    As Python's gzip module (numcodecs' GZip) reads: members follow each other, zero
    padding between them is skipped, an empty input is an empty stream.
    """
    parts: list[bytes] = []
    got = 0
    rest = memoryview(data).cast("B")
    while True:
        inflater = zlib.decompressobj(wbits)
        parts.append(inflater.decompress(rest, nbytes + 1 - got))
        got += len(parts[-1])
        if got > nbytes:
            raise ChunkDecodeError(f"stream decodes to more than {nbytes} bytes, expected {nbytes}")
        if not inflater.eof:  # (an empty file too)
            raise wrong_size("truncated stream decodes to", got, nbytes)
        rest = memoryview(inflater.unused_data)
        if multi_member:
            rest = memoryview(bytes(rest).lstrip(b"\0"))
        if not multi_member or not rest:
            break
    dec = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(dec) != nbytes:
        raise wrong_size("stream decodes to", len(dec), nbytes)
    return dec


def decode_zlib(
    compressor: Any, data: np.ndarray, nbytes: int, buffers: BufferPool
) -> tuple[np.ndarray, bool]:
    return np.frombuffer(_inflate(data, nbytes, zlib.MAX_WBITS, False), np.uint8), False


def decode_gzip(
    compressor: Any, data: np.ndarray, nbytes: int, buffers: BufferPool
) -> tuple[np.ndarray, bool]:
    return np.frombuffer(_inflate(data, nbytes, 16 + zlib.MAX_WBITS, True), np.uint8), False


_BY_CODEC: dict[type, IntoDecode] = {
    numcodecs.Zstd: decode_zstd,
    numcodecs.Blosc: decode_blosc,
    numcodecs.LZ4: decode_lz4,
    numcodecs.Zlib: decode_zlib,
    numcodecs.GZip: decode_gzip,
}


def into_decoder(compressor: Any | None) -> IntoDecode | None:
    """The size-checked decode of ``compressor`` (None: raw bytes), or None if it is
    not one of the formats above."""
    if compressor is None:
        return decode_raw
    return _BY_CODEC.get(type(compressor))
