"""Pure-Python codecs registered with numcodecs and zarr, as an application registers its
own: for the tests and the benchmark of ``ChunkPool(..., decode="processes")``.

``PyXor`` (numcodecs, id ``zarrscope-pyxor``; Zarr v2 compressor or filter) and
``PyXorV3`` (zarr v3 bytes-to-bytes codec ``zarrscope.pyxor``) XOR every byte with a
key in a Python loop: they hold the GIL for the whole decode, as a pure-Python codec
does. A chunk whose *stored* bytes start with a marker makes the decode misbehave on
purpose (only ever decode such chunks in worker processes):

- :data:`SEGV`: the process kills itself with SIGSEGV (no core file);
- :data:`EXIT3`: ``os._exit(3)``;
- :data:`NOMEM`: raises MemoryError;
- :data:`GATE` + a FIFO's path + ``b"\\0"``: waits until a writer opens the FIFO and
  closes it, then decodes what follows the path (a gate the test opens, to hold a
  decode in a worker).
"""

from __future__ import annotations

import os
import resource
import signal
from dataclasses import dataclass
from typing import Any

import numcodecs
import numpy as np
from numcodecs.abc import Codec
from numcodecs.compat import ensure_bytes, ndarray_copy
from zarr.abc.codec import BytesBytesCodec
from zarr.core.common import parse_named_configuration
from zarr.registry import register_codec

SEGV = b"\0CRASH:SEGV\0"
EXIT3 = b"\0CRASH:EXIT3\0"
NOMEM = b"\0CRASH:NOMEM\0"
GATE = b"\0GATE\0"


def xor(data: bytes, key: int) -> bytes:
    """Every byte XOR ``key``, in a Python loop (holding the GIL)."""
    return bytes([b ^ key for b in data])


def _misbehave(data: bytes) -> bytes:
    """Act on a marker at the start of ``data``; the bytes left to decode."""
    if data.startswith(SEGV):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.kill(os.getpid(), signal.SIGSEGV)
    if data.startswith(EXIT3):
        os._exit(3)
    if data.startswith(NOMEM):
        raise MemoryError("test codec out of memory")
    if data.startswith(GATE):
        path, _, rest = data[len(GATE) :].partition(b"\0")
        with open(path, "rb") as fifo:  # blocks until the test opens it for writing
            fifo.read()  # until the test closes it
        return rest
    return data


class PyXor(Codec):
    """numcodecs codec: XOR with ``key``, byte by byte in Python."""

    codec_id = "zarrscope-pyxor"

    def __init__(self, key: int = 0x5A):
        self.key = key

    def encode(self, buf: Any) -> bytes:
        return xor(ensure_bytes(buf), self.key)

    def decode(self, buf: Any, out: Any = None) -> Any:
        dec = np.frombuffer(xor(_misbehave(ensure_bytes(buf)), self.key), np.uint8)
        return ndarray_copy(dec, out)


numcodecs.register_codec(PyXor)


@dataclass(frozen=True)
class PyXorV3(BytesBytesCodec):
    """zarr v3 bytes-to-bytes codec: XOR with ``key``, byte by byte in Python."""

    is_fixed_size = True
    key: int = 0x5A

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PyXorV3:
        _, config = parse_named_configuration(data, "zarrscope.pyxor")
        return cls(**(config or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"name": "zarrscope.pyxor", "configuration": {"key": self.key}}

    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        decoded = xor(_misbehave(chunk_bytes.to_bytes()), self.key)
        return chunk_spec.prototype.buffer.from_bytes(decoded)

    def _encode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        return chunk_spec.prototype.buffer.from_bytes(xor(chunk_bytes.to_bytes(), self.key))

    async def _decode_single(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        return self._decode_sync(chunk_bytes, chunk_spec)

    async def _encode_single(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        return self._encode_sync(chunk_bytes, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: Any) -> int:
        return input_byte_length


register_codec("zarrscope.pyxor", PyXorV3)
