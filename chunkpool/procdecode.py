"""Decoding in worker processes: ``ChunkPool(..., decode="processes")``.

Why: a codec that holds the GIL (a pure-Python codec or filter an application
registered with zarr or numcodecs) decodes one chunk at a time in threads, whatever the
number of cores; in processes it scales with them. And a codec that crashes (a
segfault in a C extension, ``os._exit``, running out of memory) takes down a worker,
not the application.

**Workers.** At most ``size`` processes (default: one per CPU), started when a decode
needs one, from multiprocessing's *forkserver* (``spawn`` where there is none), never
forked from the application, whose other threads may hold locks. The forkserver
preloads this module (numpy, zarr, numcodecs, chunkpool: about 0.6 s, once per
application); a worker then starts in ~25 ms (if the application started the
forkserver earlier without this module, each worker imports it: ~0.5 s). Each gets the application's
``sys.path`` and ignores SIGINT (a Ctrl-C is the application's to handle). The pool's
decode slots (``cpu_workers``) are threads that hand their chunks to a free worker,
so the scheduler, priorities, batches and cancellation are those of thread mode: a
chunk dropped while a worker decodes it has its result discarded.

**Pipelines.** A slot's chunks go through a :class:`DecodePipeline`: a scheduler
batch's chunks are sent to one worker as they are read (the pipe queues them), so the
worker goes from one job to the next while the thread reads the next chunk, and the
thread waits once per batch (without the GIL). The worker replies to each job as soon
as it is decoded, but wakes the waiting thread only when it has no job left (a byte
on a second pipe, whose end also shows its exit): one wake-up per batch, not per
chunk. A single chunk (an asynchronous store's) is a pipeline of one.

**Codecs.** A worker rebuilds each level's :class:`~chunkpool.source.ChunkSource` from
a pickle of its :class:`~chunkpool.info.ScaleInfo` whose array has the same metadata
(codecs, dtype, chunk grid, fill value) over an empty in-memory store, and decodes
with it: the very decoders and decoded-size and shape checks of thread mode (the
header checks of :mod:`chunkpool.frames`, the byte count before the array-to-bytes
step, the final shape, ``MAX_CHUNK_BYTES``, cropping, byte order). Unpickling imports
the module that defines each codec class, which is where an application's codecs
register themselves (``numcodecs.register_codec``, ``zarr.registry.register_codec``):
so a codec class must live in an importable module, or in the main script, which the
forkserver imports as ``__mp_main__`` as multiprocessing always does (keep its work
under ``if __name__ == "__main__":``). A codec that cannot be pickled or imported
fails its chunks with a :class:`~chunkpool.errors.ChunkDecodeError` saying so.

**Memory.** In this mode the pool's recycled buffers (:class:`SharedBuffers`) are carved
out of files under ``/dev/shm``, which the pool alone creates, maps and unlinks. Only
references travel over a worker's pipe: (segment, size, offset, length) of the encoded
bytes (read there, or copied there: a remote store's) and of the buffer to decode into,
taken from the pool's free list. A local store's chunk file (a plain file, not a link;
not a shard's inner chunk) is not read by this process at all: it takes the file's
``lstat`` (its stamp, taken before the read, never of a later version than the one read;
the directory's check of :mod:`chunkpool.links` included) and sends its key; the worker
reads it with the same reader and rules (``O_NOFOLLOW``, each directory resolved inside
the root), into memory of its own, a file gone meanwhile being a missing chunk; where
thread mode reads and decodes full chunks natively (:mod:`chunkpool.native`: raw bytes,
zstd), the worker does so too, straight into the output buffer (anything it leaves, the
Python path reads and judges, as in threads). That moves the read's system calls and
copy, and their GIL hand-offs, out of this process, whose threads share one GIL. The
reply, a fixed record (no pickle), says how the job went and the memory order (the dtype
and shape are the level's: checked by the worker, or by construction on the native
path). ``ChunkLocation.data`` is then a read-only view of that buffer, recycled by the
pool's usual rule: it returns to the free list when the last array or view of it dies,
and only then can it be given to a worker again. A worker writes into a buffer only
between the job's sending and its reply (or the worker's exit), and the buffer returns
to the free list only after that; a buffer whose worker may still run (killed but not
seen to exit) is never reused.

**Failures.** A worker that dies while decoding fails that chunk with a
:class:`~chunkpool.errors.DecodeWorkerError` naming the store, the key, the worker's
pid and its exit reason (``"killed by SIGSEGV"``, ``"exit code 3"``); a codec raising
MemoryError fails its chunk the same way, and its worker exits after replying (its
heap may be the problem); a worker's read that fails (a link out of the root, an OS
error) fails its chunk with the :class:`~chunkpool.errors.ChunkReadError` thread mode
raises. A decode running longer than ``timeout`` (default
:data:`DECODE_TIMEOUT`, counted from the end of the job before it) is killed and fails
its chunk. The jobs of the same pipeline that it had decoded keep their results; those
queued behind it, never started, go to another worker (unless the dead one is not seen
to exit: then they fail too, and their buffers are not reused). A dead worker is
replaced by the next decode that needs one; the other chunks keep loading. A worker
found dead before it took a job costs no chunk: the job goes to another.

**Lifetime.** :meth:`DecodeProcesses.close` (run by ``ChunkPool.destroy()``) stops the
idle workers, kills the busy ones at once (their results would be discarded) and waits
for them within its timeout, then unlinks every segment: ``/dev/shm`` holds nothing of
the pool afterwards, also after a worker crashed (workers create nothing there). Chunk
arrays the application still holds stay valid (an unlinked file's memory lives until
its last mapping goes). A segment whose buffers are all gone is unlinked at once, and
the workers that mapped it unmap it with their next job. Segments left by a process
that was killed (SIGKILL: no cleanup ran) are unlinked by the next process that makes
a pool in this mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import mmap
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import pickle
import secrets
import select
import signal
import struct
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import zarr
from zarr.storage import MemoryStore, StorePath

from . import native
from .buffers import BufferPool, _Owner, transient_size
from .errors import ChunkDecodeError, ChunkReadError, DecodeWorkerError
from .source import MAX_CHUNK_BYTES, ChunkSource, RawChunk, _LocalReader
from .stores import describe_error

__all__ = ["DECODE_TIMEOUT", "DecodeProcesses", "SharedBuffers", "decode_setup"]

#: Where the shared segments live (tmpfs on Linux).
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
#: Name prefix of the segments: ``chunkpool-shm-<pid>-<n>-<random>``.
SEGMENT_PREFIX = "chunkpool-shm-"
#: Seconds a decode may take (and a decode may wait for a free worker) before its
#: worker is killed (it fails the chunk).
DECODE_TIMEOUT = 60.0
#: Seconds to wait for a worker that closed its pipe, or was killed, to exit.
EXIT_WAIT = 2.0
#: Name of the worker processes (``multiprocessing.active_children()`` shows them).
PROCESS_NAME = "chunkpool-decode"
#: A pipeline's jobs whose files the worker reads go down its pipe in groups of this
#: many (the first job at once): the thread's part of such a job is an ``lstat`` (~10
#: µs), so a group is ready long before the worker is through the job before it, and
#: each group costs one write here and one read there.
SEND_GROUP = 4

_segment_numbers = itertools.count()
_swept = False
_context_lock = threading.Lock()

#: A reference to bytes in a segment: (name, segment size, offset, length).
Ref = tuple[str, int, int, int]

# The pipe's messages. To a worker: a 4-byte length, then a pickle of (jobs, segments
# to forget, sources to forget). From a worker, per job: a fixed record (its kind, the
# length of what follows it, the seconds the job took and when it ended, by
# ``time.monotonic``, which every process shares), then that many bytes of an error's
# message (none for a decoded chunk: its dtype and shape are the level's, checked by
# the worker, so only its memory order is told). No pickle per chunk, one write each.
_LENGTH = struct.Struct("!I")
_REPLY = struct.Struct("<BxxxIdd")
#: Reply kinds: decoded (in C order, in Fortran order), a ChunkDecodeError, another
#: exception, out of memory (the worker exits after this reply); for a file the worker
#: read: no such file (the chunk is missing), the read failed (the reason).
_OK_C, _OK_F, _ERROR, _FAILED, _EXIT, _MISSING, _READ_ERROR = range(7)


def _text(message: str) -> bytes:
    """A message for a reply (any string: a path's undecodable bytes are escaped)."""
    return message.encode(errors="backslashreplace")


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the blocking descriptor ``fd``."""
    n = os.write(fd, data)
    if n < len(data):
        view = memoryview(data)
        while n < len(data):
            n += os.write(fd, view[n:])


def decode_setup(
    decode: str, processes: int | None, recycle_bytes: int
) -> tuple[BufferPool, DecodeProcesses | None]:
    """A pool's buffers and decode processes for its ``decode`` mode."""
    if decode == "threads":
        if processes is not None:
            raise ValueError("decode_processes needs decode='processes'")
        return BufferPool(recycle_bytes), None
    if decode == "processes":
        buffers = SharedBuffers(recycle_bytes)
        return buffers, DecodeProcesses(buffers, processes)
    raise ValueError(f"decode must be 'threads' or 'processes', not {decode!r}")


def _address(arr: np.ndarray) -> int:
    return arr.__array_interface__["data"][0]


def _unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHM_DIR, name))


def _sweep_stale() -> None:
    """Unlink the segments of chunkpool processes that no longer exist (killed before
    they could clean up). Once per process."""
    global _swept
    if _swept:
        return
    _swept = True
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        pid = name[len(SEGMENT_PREFIX) :].partition("-")[0]
        if not name.startswith(SEGMENT_PREFIX) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):  # (another user's)
                _unlink(name)
        except OSError:  # a live process of another user
            pass


class SharedBuffers(BufferPool):
    """A :class:`~chunkpool.buffers.BufferPool` whose arenas are files under
    :data:`SHM_DIR`, mapped here and by the decode workers. The same recycling rules;
    an arena whose buffers are all gone is unlinked, and :meth:`close` unlinks every
    one (arenas made afterwards are private memory)."""

    def __init__(self, max_free_bytes: int = 64 << 20):
        super().__init__(max_free_bytes)
        _sweep_stale()
        self._arenas: dict[int, tuple[str, int, int]] = {}  # id -> (name, size, address)
        self._live: set[str] = set()  # segment names not unlinked yet
        self._closed = False
        #: Called with a segment's name when it is unlinked (from any thread, maybe
        #: inside a garbage collection: it must take no lock).
        self.on_retire: Callable[[str], None] | None = None

    def _new_arena(self, nbytes: int) -> np.ndarray:
        if self._closed or nbytes == 0:
            return super()._new_arena(nbytes)
        name = f"{SEGMENT_PREFIX}{os.getpid()}-{next(_segment_numbers)}-{secrets.token_hex(4)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            mapping = mmap.mmap(fd, nbytes)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        arena = np.ndarray.__new__(_Owner, (nbytes,), np.uint8, buffer=mapping)
        self._live.add(name)
        self._arenas[id(arena)] = (name, nbytes, _address(arena))
        weakref.finalize(arena, self._retire, id(arena), name)
        return arena

    def _retire(self, key: int, name: str) -> None:
        """An arena died: unlink its file (if close did not), tell the workers."""
        self._arenas.pop(key, None)
        if name in self._live:
            self._live.discard(name)
            _unlink(name)
        callback = self.on_retire
        if callback is not None:
            callback(name)

    def ref(self, buffer: np.ndarray, nbytes: int) -> Ref | None:
        """Where ``buffer`` (taken from this pool) is: its segment, the segment's size
        and its offset there, with ``nbytes``; None if not shared. Remembered on the
        buffer, which is recycled: found again at no cost."""
        place = buffer.__dict__.get("_place")
        if place is None:
            info = self._arenas.get(id(buffer.base))
            if info is None:
                return None
            name, size, address = info
            place = buffer.__dict__["_place"] = (name, size, _address(buffer) - address)
        return (*place, nbytes)

    def close(self) -> None:
        """Unlink every segment and recycle nothing more."""
        self._closed = True
        self.max_free_bytes = 0
        self.clear()
        for name in list(self._live):
            self._live.discard(name)
            _unlink(name)


def _context() -> Any:
    """The forkserver context (spawn where there is none), its server preloading this
    module (added to what the application asked for, if it starts the server)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    with _context_lock:
        server = getattr(multiprocessing.forkserver, "_forkserver", None)
        if server is not None and getattr(server, "_forkserver_pid", 0) is None:
            preload = list(getattr(server, "_preload_modules", ["__main__"]))
            if __name__ not in preload:
                context.set_forkserver_preload([*preload, __name__])
    return context


#: Held to start a worker and to read one's exit status: ``Process.start()`` polls every
#: child, and two threads reading a child's status at once leave one of them a wrong
#: exit code (255).
_children_lock = threading.Lock()


def _join(process: Any, timeout: float) -> int | None:
    """Wait up to ``timeout`` seconds for ``process`` to end; its exit code, None if it
    has not (the status read under :data:`_children_lock`)."""
    multiprocessing.connection.wait([process.sentinel], max(0.0, timeout))
    with _children_lock:
        process.join(0)
        return process.exitcode


def _exit_reason(code: int | None) -> str | None:
    if code is None:
        return None
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Worker:
    """The application's side of one worker process: its pipe, and what it knows."""

    __slots__ = (
        "conn",
        "forget_segments",
        "forget_specs",
        "mapped",
        "pid",
        "process",
        "received",
        "replies",
        "specs",
        "wake",
        "wakes",
    )

    def __init__(self, context: Any):
        self.conn, child = context.Pipe()
        # a byte on ``wake`` each time it has replied to every job it was sent
        self.wake, wake = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_serve, args=(child, wake, list(sys.path)), name=PROCESS_NAME, daemon=True
        )
        try:
            with _children_lock:
                self.process.start()
        finally:
            child.close()
            wake.close()
        self.pid: int = self.process.pid
        # (made once: no selector per wait)
        self.replies = select.poll()
        self.replies.register(self.conn.fileno(), select.POLLIN)
        self.wakes = select.poll()
        self.wakes.register(self.wake.fileno(), select.POLLIN)
        self.specs: set[int] = set()  # the sources it has rebuilt
        self.mapped: set[str] = set()  # the segments it has mapped
        # what it must forget with its next job (appended to without a lock)
        self.forget_segments: list[str] = []
        self.forget_specs: list[int] = []
        self.received = bytearray()  # replies read from the pipe, not yet taken

    def send(self, message: tuple) -> None:
        """Send a message of jobs (raises OSError or ValueError if the worker is gone)."""
        blob = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        _write_all(self.conn.fileno(), _LENGTH.pack(len(blob)) + blob)

    def reply(self) -> tuple[int, float, float, bytes] | None:
        """The next reply received, if a whole one is: (kind, seconds the job took,
        when it ended, what follows the record)."""
        received = self.received
        if len(received) < _REPLY.size:
            return None
        kind, extra, seconds, ended = _REPLY.unpack_from(received)
        end = _REPLY.size + extra
        if len(received) < end:
            return None
        payload = bytes(received[_REPLY.size : end]) if extra else b""
        del received[:end]
        return kind, seconds, ended, payload

    def end(self, timeout: float) -> str | None:
        """Close the pipe (an idle worker then exits), wait up to ``timeout`` for the
        process to end, kill it if it did not; its exit reason, None if it is still
        not seen to have exited."""
        self.conn.close()
        self.wake.close()
        code = _join(self.process, timeout)
        if code is None:
            self.process.kill()
            code = _join(self.process, EXIT_WAIT)
        return _exit_reason(code)


class _NoWorker(Exception):
    """No worker for a job: ``reason``, for the chunks' messages."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Job:
    """One chunk on its way through a worker (see :meth:`DecodeProcesses._prepare`)."""

    __slots__ = (
        "copy",
        "index",
        "inp",
        "key",
        "out",
        "out_ref",
        "raw",
        "source",
        "spec",
        "spec_id",
    )

    def __init__(self, key: Any, source: ChunkSource, index: tuple[int, ...], raw: RawChunk):
        self.key = key
        self.source = source
        self.index = index
        self.raw = raw
        self.spec_id = -1
        self.spec = b""
        self.inp: Ref | str | None = None  # (str: the key of a file the worker reads)
        self.out_ref: Ref | None = None
        self.copy: np.ndarray | None = None  # the encoded bytes' copy in shared memory
        self.out: np.ndarray | None = None  # the buffer the worker decodes into

    @property
    def where(self) -> str:
        """The chunk, for messages: the store and the key."""
        return _where(self.source, self.index)


def _where(source: ChunkSource, index: tuple[int, ...]) -> str:
    return f"{source.name}/{source._chunk_key(index)}"


#: A decoded job: (its key, the chunk or None, the error or None, seconds the worker
#: took to decode it).
Decoded = tuple[Any, np.ndarray | None, BaseException | None, float]


class DecodePipeline:
    """Chunks decoded in turn by one worker while the thread that submits them reads
    the next ones (a scheduler batch's, or a single chunk).

    Each submitted job goes down the worker's pipe as soon as a worker is free (the
    pipe queues them; until then they wait here, and the thread reads on; jobs whose
    files the worker reads go in groups of :data:`SEND_GROUP`), so the
    worker goes from one job to the next without waiting for this process, and this
    thread waits once, in :meth:`finish`, which reads the worker's replies (one per
    job, in order). A worker lost during a job fails that job only, with the worker's
    exit reason; the jobs queued behind it, never started, go to another worker. A
    job's buffers go back to the free list once its worker replied or is seen to have
    exited. Used by one thread at a time; :meth:`finish` lets the worker go."""

    def __init__(self, processes: DecodeProcesses):
        self._processes = processes
        self._worker: _Worker | None = None
        self._broken = False  # whether a send to the worker failed (it died)
        self._unsent: deque[_Job] = deque()  # waiting for a worker
        self._sent: deque[_Job] = deque()  # in the worker's pipe, in order
        self._results: list[Decoded] = []
        self._since = 0.0  # when the worker started on the oldest sent job (at the latest)
        self._dead_before = 0  # workers found dead before they took a job

    def submit(self, key: Any, source: ChunkSource, index: tuple[int, ...], raw: RawChunk) -> None:
        """Decode present chunk ``index`` of ``source`` (its result is ``key``'s in
        :meth:`finish`); ``raw`` is the pipeline's now."""
        try:
            job = self._processes._prepare(key, source, index, raw)
        except ChunkDecodeError as err:
            self._results.append((key, None, err, 0.0))
            return
        self._unsent.append(job)
        if self._worker is None:
            try:
                self._worker = self._processes._acquire(wait=False)
            except _NoWorker:
                return  # (finish tries again, and fails the jobs if it must)
        if (
            self._worker is not None
            and not self._broken
            and (not self._sent or raw.unread is None or len(self._unsent) >= SEND_GROUP)
        ):
            self._send()

    def finish(self) -> list[Decoded]:
        """Wait for every submitted job (each at most the processes' ``timeout`` once
        its worker has it) and return their results, in order of completion."""
        processes = self._processes
        if self._unsent and self._worker is not None and not self._broken:
            self._send()  # (the rest of a group)
        while self._unsent or self._sent:
            if self._sent:
                self._receive()
                continue
            if self._worker is not None and self._broken:  # died before it took a job
                processes._lose(self._worker)
                self._worker, self._broken = None, False
                self._dead_before += 1
            if self._worker is None:
                if self._dead_before >= 3:
                    self._fail_unsent("decode workers keep dying before taking a job")
                    break
                try:
                    self._worker = processes._acquire(wait=True)
                except _NoWorker as no:
                    self._fail_unsent(no.reason)
                    break
            self._send()
        if self._worker is not None:
            worker, self._worker = self._worker, None
            if self._broken:
                processes._lose(worker)
            else:
                processes._release(worker)
        results, self._results = self._results, []
        return results

    def _send(self) -> None:
        """Send the waiting jobs to the worker in one message."""
        worker = self._worker
        assert worker is not None
        jobs = list(self._unsent)
        message = []
        for job in jobs:
            assert job.inp is not None
            if type(job.inp) is tuple:
                worker.mapped.add(job.inp[0])
            if job.out_ref is not None:
                worker.mapped.add(job.out_ref[0])
            known = job.spec_id in worker.specs
            worker.specs.add(job.spec_id)
            message.append(
                (job.spec_id, None if known else job.spec, job.index, job.inp, job.out_ref)
            )
        forget_segments, worker.forget_segments = worker.forget_segments, []
        forget_specs, worker.forget_specs = worker.forget_specs, []
        try:
            worker.send((message, forget_segments, forget_specs))
        except (OSError, ValueError):  # it died: these jobs never reached it
            self._broken = True
            return
        if not self._sent:
            self._since = time.monotonic()
        self._sent.extend(jobs)
        self._unsent.clear()

    def _receive(self) -> None:
        """Take the worker's replies to the sent jobs, waiting (one wake-up, when the
        worker has run out of jobs, or it died) if there is none yet; or see the worker
        lost: dead, or killed when the oldest sent job has run ``timeout`` seconds."""
        worker = self._worker
        assert worker is not None
        if self._take_replies(worker) or self._worker is None:
            return
        left = self._since + self._processes.timeout - time.monotonic()
        woken = worker.wakes.poll(max(0, math.ceil(left * 1000)))
        if woken:
            try:
                gone = not os.read(worker.wake.fileno(), 4096)  # (EOF: it exited)
            except OSError:
                gone = True
            if gone:  # its replies end at its exit: wait for that end of its pipe too
                worker.replies.poll(math.ceil(EXIT_WAIT * 1000))
        if self._take_replies(worker) or self._worker is None or woken:
            return
        worker.process.kill()  # no progress within the timeout
        self._lose_worker(f"did not finish within {self._processes.timeout:g} s and was killed")

    def _take_replies(self, worker: _Worker) -> bool:
        """Take the replies the worker has sent so far (without waiting); whether it
        made progress. Sees the worker lost if its pipe ended."""
        processes = self._processes
        took = False
        while self._sent:
            reply = worker.reply()
            if reply is None:  # read what it sent (all of it, in one read)
                if not worker.replies.poll(0):
                    break
                try:
                    data = os.read(worker.conn.fileno(), 1 << 16)
                except OSError:
                    data = b""
                if not data:  # it died (its end of the pipe closed)
                    self._lose_worker(None)
                    return took
                worker.received += data
                continue
            took = True
            kind, seconds, ended, extra = reply
            job = self._sent[0]
            if kind == _EXIT:  # it ran out of memory, replied, and exits
                processes._lose(worker)
                reason = extra.decode()
                self._lost(f"{reason}; it is replaced", reason, settled=True)
                return took
            self._sent.popleft()
            self._since = ended  # when it finished that job: it began the next
            if kind == _FAILED:
                worker.specs.discard(job.spec_id)  # (it may not have rebuilt the source)
            elif kind == _MISSING:  # its file is gone: the fill value, as in thread mode
                self._end(job, job.source.decode(job.index, RawChunk(None, 0)), None, seconds)
                continue
            try:
                data = processes._result(job, kind, extra)
            except (ChunkDecodeError, ChunkReadError) as err:
                self._end(job, None, err, seconds)
                continue
            job.out = None  # it is the result's now
            self._end(job, data, None, seconds)
        return took

    def _lose_worker(self, killed: str | None) -> None:
        """The worker's pipe ended (``killed`` None), or it was killed: its oldest sent
        job fails with its exit reason."""
        worker = self._worker
        assert worker is not None
        reason = self._processes._lose(worker)
        what = killed or reason or "closed its pipe"
        self._lost(what, reason or what, settled=reason is not None)

    def _lost(self, what: str, reason: str, settled: bool) -> None:
        """The worker died, or was killed, during the oldest sent job: that job fails;
        those queued behind it go to another worker, or fail too if the dead one may
        still run (``settled``: it is known to have exited)."""
        worker = self._worker
        assert worker is not None
        self._worker, self._broken = None, False
        queued = list(self._sent)
        self._sent.clear()
        for i, job in enumerate(queued):
            if i and settled:
                self._unsent.extendleft(reversed(queued[i:]))  # never started: in order
                break
            error = DecodeWorkerError(
                f"{job.where}: decode worker (pid {worker.pid}) {what}", exit_reason=reason
            )
            self._end(job, None, error, 0.0, recycle=settled)

    def _fail_unsent(self, reason: str) -> None:
        while self._unsent:
            job = self._unsent.popleft()
            self._end(job, None, ChunkDecodeError(f"{job.where}: {reason}"), 0.0)

    def _end(
        self,
        job: _Job,
        data: np.ndarray | None,
        error: BaseException | None,
        seconds: float,
        recycle: bool = True,
    ) -> None:
        if recycle:
            self._processes._recycle(job)
        self._results.append((job.key, data, error, seconds))


class DecodeProcesses:
    """The worker processes of one pool, and decoding a chunk with one of them."""

    def __init__(
        self, buffers: SharedBuffers, size: int | None = None, *, timeout: float = DECODE_TIMEOUT
    ):
        if size is not None and size < 1:
            raise ValueError(f"decode_processes must be >= 1, not {size}")
        #: How many workers may run at once.
        self.size = size or os.cpu_count() or 1
        self.timeout = timeout
        self._buffers = buffers
        buffers.on_retire = self._segment_retired
        self._cond = threading.Condition()
        self._workers: list[_Worker] = []  # started and not known dead
        self._idle: list[_Worker] = []
        self._starting = 0
        self._waiting = 0  # threads waiting for a free worker
        self._closed = False
        self._specs_lock = threading.Lock()
        self._specs: weakref.WeakKeyDictionary[ChunkSource, tuple[int, bytes]] = (
            weakref.WeakKeyDictionary()
        )
        self._spec_ids = itertools.count()
        #: Workers started, and lost (died or killed), so far.
        self.started = 0
        self.lost = 0

    @property
    def pids(self) -> list[int]:
        """The pids of the workers running now."""
        with self._cond:
            return [worker.pid for worker in self._workers]

    # -- decoding -----------------------------------------------------------------------

    def decode(self, source: ChunkSource, index: tuple[int, ...], raw: RawChunk) -> np.ndarray:
        """:meth:`ChunkSource.decode` of a present chunk, run by a worker process; the
        result is a read-only view of shared memory (see the module docstring)."""
        pipeline = self.pipeline()
        pipeline.submit(None, source, index, raw)
        ((_, data, error, _),) = pipeline.finish()
        if error is not None:
            raise error
        assert data is not None
        return data

    def pipeline(self) -> DecodePipeline:
        """A :class:`DecodePipeline` of this pool's workers, for one thread's chunks."""
        return DecodePipeline(self)

    def _prepare(
        self, key: Any, source: ChunkSource, index: tuple[int, ...], raw: RawChunk
    ) -> _Job:
        """A job for a worker: its spec, its encoded bytes in shared memory (copied
        there if not read there) and its output buffer, taken from the free list. On
        failure (the codecs cannot be sent, the pool closed) gives ``raw`` back and
        raises :class:`~chunkpool.errors.ChunkDecodeError`."""
        buffers = self._buffers
        data = raw.data
        assert data is not None
        job = _Job(key, source, index, raw)
        try:
            job.spec_id, job.spec = self._spec(source, index)
            inp: Ref | str | None
            if raw.unread is not None:  # a local file: the worker reads it
                inp = raw.unread
            elif raw.owner is not None:  # (its bytes start at its start: _LocalReader.pread)
                inp = buffers.ref(raw.owner, data.nbytes)
            else:
                inp = None
            if inp is None:  # not read into shared memory (a small read, a remote store)
                job.copy = copy = buffers.take(transient_size(data.nbytes))
                copy[: data.nbytes] = data
                inp = buffers.ref(copy, data.nbytes)
            nbytes = source._decode.nbytes  # (a larger chunk fails in the worker, unallocated)
            if 0 < nbytes <= MAX_CHUNK_BYTES:
                job.out = buffers.take(nbytes)
            out_ref = None if job.out is None else buffers.ref(job.out, nbytes)
            if inp is None or (job.out is not None and out_ref is None):  # closed meanwhile
                raise ChunkDecodeError(f"{job.where}: the pool's decode processes are closed")
        except BaseException:
            self._recycle(job)
            raise
        job.inp, job.out_ref = inp, out_ref
        return job

    def _recycle(self, job: _Job) -> None:
        """Give a job's buffers back (no worker can write into them or read them now)."""
        buffers = self._buffers
        if job.out is not None:
            buffers.give(job.out)
            job.out = None
        if job.copy is not None:
            buffers.give(job.copy)
            job.copy = None
        job.source.release(job.raw)

    def _result(self, job: _Job, kind: int, extra: bytes) -> np.ndarray:
        """The chunk a worker's reply describes, over ``job.out``; or its error, raised."""
        out = job.out
        if kind == _ERROR:  # a ChunkDecodeError, as thread mode raises it
            raise ChunkDecodeError(extra.decode())
        if kind == _FAILED:
            raise ChunkDecodeError(f"{job.where}: in a decode process: {extra.decode()}")
        if kind == _READ_ERROR:  # as thread mode's read raises it
            reason = extra.decode()
            raise ChunkReadError(f"{job.source.name}/{job.inp}: {reason}", reason=reason)
        # the level's dtype and the chunk's shape (the worker checked), in its order
        source = job.source
        dtype, shape = source.scale.dtype, source.chunk_data_shape(job.index)
        order = "C" if kind == _OK_C else "F"
        nbytes = math.prod(shape) * dtype.itemsize
        if out is None or nbytes > out.nbytes:
            if nbytes:
                raise ChunkDecodeError(f"{job.where}: a decode process returned {nbytes} bytes")
            arr = np.empty(shape, dtype)
        else:
            arr = self._buffers.hand_out(out, dtype, shape, order)  # (maybe its start)
        arr.flags.writeable = False
        return arr

    def _spec(self, source: ChunkSource, index: tuple[int, ...]) -> tuple[int, bytes]:
        """The id and pickle a worker rebuilds ``source``'s decoding from."""
        entry = self._specs.get(source)
        if entry is not None:
            return entry
        with self._specs_lock:
            entry = self._specs.get(source)
            if entry is None:
                scale = source.scale
                array = scale.array.async_array
                empty = zarr.AsyncArray(
                    metadata=array.metadata,
                    store_path=StorePath(MemoryStore(), array.store_path.path),
                    config=array.config,
                )
                copy = dataclasses.replace(scale, array=zarr.Array(empty))
                try:
                    root = None if source._local is None else source._local.root
                    blob = pickle.dumps((copy, source.name, root), pickle.HIGHEST_PROTOCOL)
                except Exception as err:
                    raise ChunkDecodeError(
                        f"{_where(source, index)}: its codecs cannot be sent to a decode process "
                        f"({type(err).__name__}: {err})"
                    ) from None
                entry = self._specs[source] = (next(self._spec_ids), blob)
                weakref.finalize(source, self._spec_gone, entry[0])
        return entry

    # -- workers ------------------------------------------------------------------------

    def _acquire(self, wait: bool) -> _Worker | None:
        """A free worker, started if fewer than ``size`` run; else, with ``wait``, the
        first to become free within ``timeout`` seconds (without: None, and a free
        worker goes to a thread that waits first). Raises :class:`_NoWorker`."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while True:
                if self._closed:
                    raise _NoWorker("the pool's decode processes are closed")
                if self._idle and (wait or not self._waiting):
                    return self._idle.pop()
                if len(self._workers) + self._starting < self.size:
                    self._starting += 1
                    break
                if not wait:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _NoWorker(f"no decode worker became free within {self.timeout:g} s")
                self._waiting += 1
                try:
                    self._cond.wait(left)
                finally:
                    self._waiting -= 1
        worker: _Worker | None = None
        try:
            worker = _Worker(_context())
        except Exception as err:
            raise _NoWorker(
                f"could not start a decode worker ({type(err).__name__}: {err})"
            ) from None
        finally:
            with self._cond:
                closed = self._closed
                if worker is not None and not closed:
                    self._workers.append(worker)
                    self.started += 1
            if worker is not None and closed:
                worker.end(EXIT_WAIT)
            with self._cond:
                self._starting -= 1
                self._cond.notify_all()
        if closed:
            raise _NoWorker("the pool's decode processes are closed")
        return worker

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            if not self._closed:
                self._idle.append(worker)
                self._cond.notify()
                return
        worker.end(EXIT_WAIT)

    def _lose(self, worker: _Worker) -> str | None:
        """Let a dead (or killed) worker go, so that another may start; its exit reason."""
        with self._cond:
            if worker in self._workers:
                self._workers.remove(worker)
                self.lost += 1
            self._cond.notify()
        return worker.end(EXIT_WAIT)

    def _segment_retired(self, name: str) -> None:
        for worker in list(self._workers):  # (no lock: see SharedBuffers.on_retire)
            if name in worker.mapped:
                worker.mapped.discard(name)
                worker.forget_segments.append(name)

    def _spec_gone(self, spec_id: int) -> None:
        for worker in list(self._workers):
            if spec_id in worker.specs:
                worker.specs.discard(spec_id)
                worker.forget_specs.append(spec_id)

    def close(self, timeout: float) -> None:
        """Stop every worker (idle ones asked to, busy ones killed: their results would
        be discarded), waiting at most ``timeout`` seconds in all, then unlink every
        segment. Decodes asked for afterwards fail."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            while self._starting and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            workers, self._workers = self._workers, []
            idle, self._idle = self._idle, []
        for worker in workers:
            if any(worker is w for w in idle):
                worker.conn.close()  # it exits at the end of its pipe
                worker.wake.close()
            else:
                worker.process.kill()  # a thread waits for it: it sees the end
        for worker in workers:
            _join(worker.process, deadline - time.monotonic())
        for worker in workers:
            if _join(worker.process, 0.0) is None:
                worker.process.kill()
                _join(worker.process, min(EXIT_WAIT, deadline - time.monotonic()))
        self._buffers.close()


# -- the worker process -------------------------------------------------------------------


class _SlotBuffers(BufferPool):
    """A worker's buffers: the job's output buffer (the application's, shared) for the
    decode that asks for its size, private memory for anything else. The output buffer
    is never kept here (it is not this process's to reuse)."""

    def __init__(self) -> None:
        super().__init__(16 << 20)
        self.slot: np.ndarray | None = None
        self._given: np.ndarray | None = None

    def take(self, nbytes: int) -> np.ndarray:
        slot = self.slot
        if slot is not None and slot.nbytes == nbytes:
            self.slot = None
            self._given = slot
            return slot
        return super().take(nbytes)

    def give(self, buffer: np.ndarray) -> None:
        if buffer is self._given:
            return
        super().give(buffer)

    def hand_out(
        self, buffer: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], order: str = "C"
    ) -> np.ndarray:
        return buffer.view(dtype).reshape(shape, order=order)  # type: ignore[call-overload]

    def start(self, slot: np.ndarray | None) -> None:
        self.slot = slot
        self._given = None


def _view(segments: dict[str, mmap.mmap], ref: Ref) -> np.ndarray:
    """The bytes ``ref`` names, mapping its segment once."""
    name, size, offset, nbytes = ref
    mapping = segments.get(name)
    if mapping is None:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            mapping = segments[name] = mmap.mmap(fd, size)
        finally:
            os.close(fd)
    return np.frombuffer(mapping, np.uint8, nbytes, offset)


class _ReadFailed(Exception):
    """A worker's read of a local chunk file failed: ``reason`` (for ChunkReadError)."""


class _Level:
    """A worker's side of one level: its source, its reader (a local store's) and how
    :mod:`chunkpool.native` reads and decodes its full chunks there (True zstd, False
    raw, None: it does not apply), as the pool's own threads would in thread mode."""

    __slots__ = ("native", "order", "reader", "source")

    def __init__(self, source: ChunkSource, reader: _LocalReader | None):
        self.source = source
        self.reader = reader
        decoder = source._decode
        self.native: bool | None = None
        self.order = _OK_C
        kind = None if reader is None else source.native_kind()
        if kind is not None and decoder.dtype == source.scale.dtype:
            self.native = kind
            self.order = _OK_F if decoder._order == "F" else _OK_C


def _read_natively(
    level: _Level, index: tuple[int, ...], key: str, out: Ref | None, segments: dict
) -> int | None:
    """Read and decode a full chunk's file straight into the output buffer without
    Python's read path (:mod:`chunkpool.native`: ``O_NOFOLLOW``, the directory checked
    here first); the reply's kind, or None: the Python path reads it (and says what is
    wrong, if anything: a link, an error, a frame of another size)."""
    source = level.source
    if out is None or source.chunk_data_shape(index) is not source.scale.chunk_shape:
        return None
    try:
        path = os.fsencode(level.reader.checked_path(key))  # type: ignore[union-attr]
    except Exception:  # (a link out of the root: the Python path says so)
        return None
    status = native.read_chunks([(path, -1, 0, _view(segments, out))], bool(level.native))
    if status[0][0] == native.DONE:
        return level.order
    return _MISSING if status[0][0] == native.MISSING else None


def _decode_job(
    level: _Level,
    index: tuple[int, ...],
    inp: Ref | str,
    out: Ref | None,
    segments: dict[str, mmap.mmap],
    buffers: _SlotBuffers,
    reads: BufferPool,
) -> int:
    """Decode one chunk into the output buffer (reading its file first if ``inp`` is
    its key, with the level's reader, into a buffer of ``reads``: the same rules as
    the pool's reads; or natively, where thread mode would); the reply's kind (the
    memory order, or ``_MISSING``). Raises :class:`_ReadFailed`."""
    source, reader = level.source, level.reader
    owner = None
    if type(inp) is str:
        assert reader is not None  # (the key of a local level's file)
        if level.native is not None:
            kind = _read_natively(level, index, inp, out, segments)
            if kind is not None:
                return kind
        try:
            read, _ = reader.read_stamped(inp)
        except Exception as err:
            raise _ReadFailed(describe_error(err)) from None
        if read is None:
            return _MISSING
        data, owner = read
    else:
        data = _view(segments, inp)  # type: ignore[arg-type]
        data.flags.writeable = False
    try:
        return _decode_into(source, index, data, out, segments, buffers)
    finally:
        if owner is not None:  # (after the copy into the output: a codec may view it)
            reads.give(owner)


def _decode_into(
    source: ChunkSource,
    index: tuple[int, ...],
    data: np.ndarray,
    out: Ref | None,
    segments: dict[str, mmap.mmap],
    buffers: _SlotBuffers,
) -> int:
    """Decode a chunk's bytes into the output buffer; the reply's kind."""
    slot = None if out is None else _view(segments, out)
    buffers.start(slot)
    try:
        arr = source.decode(index, RawChunk(data, data.nbytes))
    finally:
        buffers.start(None)
    if arr.dtype.hasobject:
        raise ChunkDecodeError(f"{source.name}: chunks of objects cannot be shared")
    # what the reply leaves out: the main process takes the level's dtype and the
    # chunk's shape (ChunkSource.decode's own checks make another impossible)
    shape = source.chunk_data_shape(index)
    if arr.dtype != source.scale.dtype or arr.shape != shape:
        raise ChunkDecodeError(
            f"{_where(source, index)}: decoded to {arr.dtype} {arr.shape}, "
            f"not {source.scale.dtype} {shape}"
        )
    kind = _OK_C
    if slot is None:
        if arr.nbytes:
            raise ChunkDecodeError(f"{source.name}: no buffer for {arr.nbytes} bytes")
    elif arr.nbytes > slot.nbytes:  # (the decode's own checks make this impossible)
        raise ChunkDecodeError(f"chunk decodes to {arr.nbytes} bytes, expected {slot.nbytes}")
    elif _address(arr) != _address(slot) or not (
        arr.flags.c_contiguous or arr.flags.f_contiguous
    ):  # decoded into memory of its own (zlib, a codec chain, a cropped edge chunk)
        np.copyto(slot[: arr.nbytes].view(arr.dtype).reshape(arr.shape), arr)
    elif not arr.flags.c_contiguous:
        kind = _OK_F  # decoded in place, in Fortran order
    return kind


def _serve(conn: Any, wake: Any, sys_path: list[str]) -> None:
    """A worker process: decode the jobs of each message from ``conn``, replying to each
    as soon as it is decoded (with the seconds it took and when it finished), and
    writing a byte to ``wake`` whenever no job is left (the one wake-up of the thread
    waiting for its replies), until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.path.extend(p for p in sys_path if p not in sys.path)
    buffers = _SlotBuffers()
    reads = BufferPool(16 << 20)  # (not the output buffers': a read is no chunk's output)
    sources: dict[int, _Level] = {}
    broken: dict[int, str] = {}  # sources that could not be rebuilt: why
    segments: dict[str, mmap.mmap] = {}
    fd = conn.fileno()
    inbox = select.poll()
    inbox.register(fd, select.POLLIN)
    wake_fd = wake.fileno()
    os.set_blocking(wake_fd, False)  # (a full pipe of wake-ups: one more is not needed)
    perf_counter, monotonic, pack = time.perf_counter, time.monotonic, _REPLY.pack
    received = bytearray()  # what was read from the pipe, from a message's start
    worked = False  # whether it replied to a job since its last wake-up byte
    while True:
        end = -1
        if len(received) >= _LENGTH.size:
            end = _LENGTH.size + _LENGTH.unpack_from(received)[0]
        if end < 0 or len(received) < end:  # (every message is read in one go, mostly)
            if worked and not inbox.poll(0):
                worked = False
                try:
                    os.write(wake_fd, b"\0")
                except BlockingIOError:
                    pass
                except OSError:
                    return
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                return
            if not data:
                return
            received += data
            continue
        jobs, forget_segments, forget_specs = pickle.loads(received[_LENGTH.size : end])
        del received[:end]
        for name in forget_segments:
            segments.pop(name, None)
        for forgotten in forget_specs:
            sources.pop(forgotten, None)
            broken.pop(forgotten, None)
        for spec_id, spec, index, inp, out in jobs:
            t0 = perf_counter()
            kind, extra = _EXIT, b""
            try:
                if spec is not None:
                    broken.pop(spec_id, None)
                    try:
                        scale, name, root = pickle.loads(spec)
                        reader = None if root is None else _LocalReader(root, reads)
                        sources[spec_id] = _Level(ChunkSource(scale, buffers, name=name), reader)
                    except Exception as err:
                        broken[spec_id] = f"{type(err).__name__}: {' '.join(str(err).split())}"
                if spec_id in broken:  # (later jobs of its message come without the spec)
                    kind, extra = _FAILED, _text(broken[spec_id])
                else:
                    kind = _decode_job(sources[spec_id], index, inp, out, segments, buffers, reads)
            except _ReadFailed as err:
                kind, extra = _READ_ERROR, _text(str(err))
            except ChunkDecodeError as err:
                cause = err.__cause__
                if isinstance(cause, MemoryError):
                    extra = _text(f"ran out of memory (MemoryError: {cause})")
                else:
                    kind, extra = _ERROR, _text(str(err))
            except MemoryError as err:
                extra = _text(f"ran out of memory (MemoryError: {err})")
            except Exception as err:
                kind = _FAILED
                extra = _text(f"{type(err).__name__}: {' '.join(str(err).split())}")
            t1 = perf_counter()
            try:
                _write_all(fd, pack(kind, len(extra), t1 - t0, monotonic()) + extra)
            except OSError:
                return
            if kind == _EXIT:
                return
        worked = True
