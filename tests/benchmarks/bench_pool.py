"""Throughput of ChunkPool against tensorstore and raw read+decode, in the same run.

For each chunk size (default 128², 256², 512²) and layout (unsharded, and 2048²
shards), loads every chunk of an 8192 x 8192 uint16 zstd Zarr v3 array (page cache
warm) with three methods, in paired rounds that alternate their order:

- ``chunkpool``: one pool, every chunk requested with ``get_chunk`` (as a viewer
  does per tile; with ``--bulk``, all with one ``get_chunks`` call, as a viewer may
  per frame), waited for, and dropped again with ``drop_chunks``; no cache, so every
  round loads everything (buffers are recycled, as in a viewer);
- ``tensorstore``: one concurrent ``read()`` per chunk, all in flight at once;
- ``raw``: the practical floor, plain threads (one per core) each reading and
  zstd-decoding its share of the chunks (through the shard index when sharded), with
  no per-chunk bookkeeping at all.

It reports, per case, the median time of each method and the pool's throughput over
each reference's as the median and quartiles of the per-round ratios (paired, so that
drifts in the machine's load cancel), and the CPU time (all threads) each method spends
per chunk. Timings on shared machines are noisy: compare the ratios, not the absolute
numbers.

    python tests/benchmarks/bench_pool.py [--rounds 15] [--chunks 128,256,512]
        [--layouts unsharded,sharded] [--size 8192]

``--decode-modes`` measures instead ``decode="processes"`` against ``decode="threads"``
(see :func:`decode_modes`):

    python tests/benchmarks/bench_pool.py --decode-modes [--rounds 9]

``--kpi`` measures the cost of the per-chunk KPI log: one pool with and without a log
file, paired, and against itself (the method's spread; goal: the log costs <= 2% of
throughput; see :func:`kpi_overhead`).

    python tests/benchmarks/bench_pool.py --kpi [--rounds 21] [--chunks 128,256]
        [--codecs zstd,blosc,python-xor]
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from numcodecs import Zstd

from chunkpool import ChunkPool, KpiLog

if TYPE_CHECKING:
    from tests.benchmarks.figures import Figure

SHARD = 2048


def make_data(n: int, seed: int = 0) -> np.ndarray:
    """A smooth field plus blobs plus noise: compresses like real microscopy."""
    rng = np.random.default_rng(seed)
    step = max(1, n // 128)
    y, x = np.mgrid[0:n:step, 0:n:step] / n
    field = np.kron((np.sin(x * 12) + np.cos(y * 9) + 2.5) * 6000, np.ones((step, step)))
    for _ in range(max(1, 300 * n * n // 8192**2)):
        cy, cx = rng.integers(0, n, 2)
        r = int(rng.integers(10, 80))
        field[max(cy - r, 0) : cy + r, max(cx - r, 0) : cx + r] += 10000
    field += rng.normal(0, 300, (n, n))
    return field.clip(0, 65535).astype(np.uint16)


def write(path: Path, data: np.ndarray, chunk: int, shard: int | None) -> None:
    """A zarr v3 array with zarr-python's defaults (bytes + zstd), optionally sharded."""
    arr = zarr.create_array(
        path,
        shape=data.shape,
        chunks=(chunk, chunk),
        shards=None if shard is None else (shard, shard),
        dtype=data.dtype,
        overwrite=True,
    )
    arr[:] = data


@dataclass
class Case:
    """One array on disk and the three ways of reading all of it."""

    path: Path
    data: np.ndarray
    chunk: int
    shard: int | None

    @property
    def label(self) -> str:
        layout = "unsharded" if self.shard is None else f"sharded {self.shard}²"
        return f"{self.chunk}² chunks, {layout}"

    @property
    def source(self) -> str:
        """What the pool opens (a subclass serves it over HTTP)."""
        return str(self.path)

    @property
    def kvstore(self) -> dict[str, str]:
        """Where tensorstore reads it."""
        return {"driver": "file", "path": str(self.path)}

    @property
    def keys(self) -> list[tuple[int, int]]:
        g = self.data.shape[0] // self.chunk
        return [(i, j) for i in range(g) for j in range(g)]


def pool_method(
    case: Case, bulk: bool = False, cpu_workers: int | None = None, **options: Any
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The pool's run, and a function that destroys the pool (``options``: the pool's)."""
    # no cache: every run loads
    (pool,) = ChunkPool.from_zarr_node(case.source, cpu_workers=cpu_workers, **options)
    keys = case.keys
    drops = [(0, idx) for idx in keys]

    def run() -> None:
        if bulk:
            pool.get_chunks(drops)
        else:
            for idx in keys:
                pool.get_chunk(0, idx)
        pool.wait_for_chunks_to_load()
        pool.drop_chunks(drops)

    # check correctness once, so the numbers are for real work
    for idx in keys[:: max(1, len(keys) // 29)]:
        loc = pool.get_chunk(0, idx, "check")
        assert np.array_equal(loc.wait(), case.data[loc.slices]), idx
        pool.drop_chunk(0, idx, "check")
    return run, pool.destroy


def tensorstore_method(case: Case) -> Callable[[], None]:
    import tensorstore as ts

    spec = {"driver": "zarr3", "kvstore": case.kvstore}
    array = ts.open(spec).result()
    c = case.chunk
    boxes = [(slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c)) for i, j in case.keys]
    assert np.array_equal(array[boxes[-1]].read().result(), case.data[boxes[-1]])

    def run() -> None:
        reads = [array[box].read() for box in boxes]
        for r in reads:
            r.result()

    return run


def raw_method(case: Case, threads: int) -> Callable[[], None]:
    """Plain threads, each reading and decoding a strided share of the files (or of the
    shards: index first, then each inner chunk's byte range)."""
    zstd = Zstd()
    c = case.chunk
    dtype = case.data.dtype

    def decode(raw: bytes) -> np.ndarray:
        return np.frombuffer(zstd.decode(raw), dtype).reshape(c, c)

    if case.shard is None:
        files = [str(case.path / "c" / str(i) / str(j)) for i, j in case.keys]

        def work(share: list[str]) -> None:
            for name in share:
                with open(name, "rb") as f:
                    decode(f.read())

        shares = [files[t::threads] for t in range(threads)]
    else:
        per = case.shard // c
        n_shards = case.data.shape[0] // case.shard
        files = [
            str(case.path / "c" / str(i) / str(j)) for i in range(n_shards) for j in range(n_shards)
        ]
        index_bytes = per * per * 16 + 4  # (offset, length) uint64 pairs + crc32c

        def work(share: list[str]) -> None:
            for name in share:
                with open(name, "rb") as f:
                    f.seek(-index_bytes, os.SEEK_END)
                    index = struct.unpack(f"<{2 * per * per}Q", f.read(index_bytes)[:-4])
                    for k in range(per * per):
                        f.seek(index[2 * k])
                        decode(f.read(index[2 * k + 1]))

        shares = [files[t::threads] for t in range(threads)]
        first = shares[0][0]
        with open(first, "rb") as f:  # the layout assumed above is the real one
            f.seek(-index_bytes, os.SEEK_END)
            offset, length = struct.unpack("<2Q", f.read(16))
            f.seek(offset)
            assert np.array_equal(decode(f.read(length)), case.data[:c, :c])

    def run() -> None:
        workers = [threading.Thread(target=work, args=(s,)) for s in shares if s]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    return run


def paired_rounds(
    methods: dict[str, Callable[[], None]],
    rounds: int,
    after: dict[str, Callable[[], None]] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds (the whole process's, all threads) of each method in each
    round. Every round runs every method once, in an order rotated each round, so
    that drifts in the machine's load hit them alike. ``after[name]``, if given, runs
    after that method's timed part, untimed (so that work it left running does not
    land in the next method's time)."""
    after = after or {}
    for fn in methods.values():
        fn()  # warm-up (page cache, thread start, buffers)
    names = list(methods)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            c0, t0 = time.process_time(), time.perf_counter()
            methods[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            if name in after:
                after[name]()
    return wall, cpu


def ratio(pool: list[float], other: list[float]) -> tuple[float, float, float]:
    """Pool throughput over the other method's, per round: (q1, median, q3)."""
    q1, q2, q3 = np.percentile(np.array(other) / np.array(pool), [25, 50, 75])
    return float(q1), float(q2), float(q3)


def run_case(
    case: Case,
    rounds: int,
    threads: int,
    bulk: bool = False,
    cpu_workers: int | None = None,
    raw: Callable[[Case, int], Callable[[], None]] = raw_method,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    pool_run, destroy = pool_method(case, bulk, cpu_workers)
    try:
        methods = {
            "chunkpool": pool_run,
            "tensorstore": tensorstore_method(case),
            "raw": raw(case, threads),
        }
        return paired_rounds(methods, rounds)
    finally:
        destroy()


def cases(tmp: Path, data: np.ndarray, chunks: list[int], layouts: list[str]) -> list[Case]:
    out = []
    for layout in layouts:
        shard = None if layout == "unsharded" else min(SHARD, data.shape[0])
        for chunk in chunks:
            path = tmp / f"c{chunk}-{layout}.zarr"
            write(path, data, chunk, shard)
            out.append(Case(path, data, chunk, shard))
    return out


def main(argv: list[str] | None = None) -> list[tuple[str, dict[str, list[float]]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--chunks", default="128,256,512", help="chunk sizes, comma-separated")
    parser.add_argument("--layouts", default="unsharded,sharded", help="unsharded and/or sharded")
    parser.add_argument("--size", type=int, default=8192, help="the array is size x size")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="raw threads")
    parser.add_argument("--bulk", action="store_true", help="the pool's get_chunks, not get_chunk")
    parser.add_argument("--cpu-workers", type=int, default=None, help="the pool's decode slots")
    args = parser.parse_args(argv)
    chunks = [int(c) for c in args.chunks.split(",")]
    layouts = args.layouts.split(",")

    data = make_data(args.size)
    results = []
    with tempfile.TemporaryDirectory(prefix="zarrscope-bench-") as tmp:
        print(
            f"{args.size}² uint16 zstd ({data.nbytes / 1e6:.0f} MB decoded), {args.rounds} "
            f"paired rounds; raw = {args.threads} plain threads read+decode; pool requests "
            f"with {'one get_chunks call' if args.bulk else 'get_chunk per chunk'}"
        )
        print(
            f"{'case':28s} {'chunks':>6s} {'pool ms':>8s} {'ts ms':>8s} {'raw ms':>8s}"
            "   pool/tensorstore [q1..q3]   pool/raw [q1..q3]   CPU µs/chunk pool ts raw"
        )
        for case in cases(Path(tmp), data, chunks, layouts):
            times, cpu = run_case(case, args.rounds, args.threads, args.bulk, args.cpu_workers)
            med = {name: statistics.median(t) * 1000 for name, t in times.items()}
            per_chunk = {
                name: statistics.median(t) * 1e6 / len(case.keys) for name, t in cpu.items()
            }
            t1, t2, t3 = ratio(times["chunkpool"], times["tensorstore"])
            r1, r2, r3 = ratio(times["chunkpool"], times["raw"])
            print(
                f"{case.label:28s} {len(case.keys):6d} {med['chunkpool']:8.1f}"
                f" {med['tensorstore']:8.1f} {med['raw']:8.1f}"
                f"   {t2:5.2f} [{t1:.2f}..{t3:.2f}]          {r2:5.2f} [{r1:.2f}..{r3:.2f}]"
                f"        {per_chunk['chunkpool']:4.0f} {per_chunk['tensorstore']:4.0f}"
                f" {per_chunk['raw']:4.0f}",
                flush=True,
            )
            results.append((case.label, times))
    return results


# -- decode="processes" against decode="threads" -----------------------------------------


DECODE_CASES = {
    # name: (codec chain for zarr.create_array, dtype, array size, chunk sizes)
    "zstd": (None, np.uint16, 4096, (256, 512)),
    "blosc": ("blosc", np.uint16, 4096, (256, 512)),
    "python-xor": ("python", np.uint8, 2048, (128,)),
}


def _decode_array(path: Path, codec: str | None, data: np.ndarray, chunk: int) -> None:
    """``data`` as a zarr v3 array: zarr's default zstd, blosc (lz4, shuffle), or a
    pure-Python XOR codec (``tests/support/pycodecs.py``: a Python loop over the bytes,
    holding the GIL, as a codec an application registers itself)."""
    kwargs: dict = {}
    if codec == "blosc":
        kwargs["compressors"] = zarr.codecs.BloscCodec(cname="lz4", shuffle="shuffle")
    elif codec == "python":
        tests = str(Path(__file__).resolve().parents[1])
        if tests not in sys.path:
            sys.path.insert(0, tests)  # (the workers get this path too)
        from support.pycodecs import PyXorV3

        kwargs["compressors"] = PyXorV3()
    arr = zarr.create_array(
        path, shape=data.shape, chunks=(chunk, chunk), dtype=data.dtype, overwrite=True, **kwargs
    )
    arr[:] = data


def _decode_mode_run(
    path: Path, data: np.ndarray, decode: str
) -> tuple[Callable[[], None], ChunkPool]:
    """A pool (no cache) decoding in ``decode`` mode: its run (every chunk, waited for,
    dropped), checked once against ``data``, and the pool."""
    (pool,) = ChunkPool.from_zarr_node(str(path), decode=decode)
    grid = pool.multiscale_info.levels[0].chunk_grid_shape
    keys = [(0, idx) for idx in np.ndindex(*grid)]

    def run() -> None:
        pool.get_chunks(keys)
        pool.wait_for_chunks_to_load()
        pool.drop_chunks(keys)

    for _, idx in keys[:: max(1, len(keys) // 7)]:
        loc = pool.get_chunk(0, idx, "check")
        assert np.array_equal(loc.wait(), data[loc.slices]), (decode, idx)
        pool.drop_chunk(0, idx, "check")
    return run, pool


def _workers_cpu(pool: ChunkPool) -> float:
    """CPU seconds the pool's decode processes have used so far (Linux ``/proc``)."""
    processes = pool._processes
    total = 0.0
    for pid in [] if processes is None else processes.pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _paired_modes(
    runs: dict[str, Callable[[], None]], pools: dict[str, ChunkPool], rounds: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """``paired_rounds`` of the two modes, with CPU seconds in all, of this process
    and of the decode processes together, per mode."""
    for fn in runs.values():
        fn()  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu = dict.fromkeys(runs, 0.0)
    names = list(runs)
    for r in range(rounds):
        for name in names[r % 2 :] + names[: r % 2]:
            c0, w0, t0 = time.process_time(), _workers_cpu(pools[name]), time.perf_counter()
            runs[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name] += time.process_time() - c0 + _workers_cpu(pools[name]) - w0
    return wall, cpu


def _xor_chunks(n: int) -> float:
    """Seconds to run the pure-Python codec's XOR over ``n`` 128² uint8 chunks."""
    tests = str(Path(__file__).resolve().parents[1])
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from support.pycodecs import xor

    chunk = bytes(range(256)) * 64
    t0 = time.perf_counter()
    for _ in range(n):
        xor(chunk, 0x5A)
    return time.perf_counter() - t0


def two_process_ceiling(rounds: int, n: int = 64) -> tuple[float, float, float]:
    """What two processes running the bare pure-Python codec achieve over one, now, on
    this machine (quartiles of paired rounds): the most any design of process mode
    can reach for a GIL-holding codec (below 2 when other load shares the cores)."""
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    per_chunk: dict[int, list[float]] = {1: [], 2: []}  # wall seconds per chunk
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as executor:
        list(executor.map(_xor_chunks, [1, 1]))  # both started
        for r in range(rounds):
            for k in (1, 2)[r % 2 :] + (1, 2)[: r % 2]:
                t0 = time.perf_counter()
                list(executor.map(_xor_chunks, [n] * k))
                per_chunk[k].append((time.perf_counter() - t0) / k)
    return ratio(per_chunk[2], per_chunk[1])


def decode_modes(argv: list[str] | None = None) -> list[tuple[str, float, tuple[float, float]]]:
    """``--decode-modes``: the pool's throughput with ``decode="processes"`` over
    ``decode="threads"``, in paired rounds of the same run (medians and quartiles of
    the per-round ratios), for zstd and blosc (their decoders release the GIL: goal
    >= 0.85) and a pure-Python codec (holds the GIL: goal >= 1.6 on 2 cores)."""
    parser = argparse.ArgumentParser(description=decode_modes.__doc__)
    parser.add_argument("--decode-modes", action="store_true")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--codecs", default=",".join(DECODE_CASES), help="comma-separated")
    args = parser.parse_args(argv)
    print(
        f"decode='processes' / decode='threads' throughput, {args.rounds} paired rounds, "
        f"{os.cpu_count()} cores (processes and threads: one per core)"
    )
    print(
        f"{'case':28s} {'chunks':>6s} {'threads ms':>10s} {'procs ms':>9s}   throughput ratio"
        " [q1..q3]   CPU µs/chunk threads procs (this process + workers)"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="zarrscope-bench-decode-") as tmp:
        for name in args.codecs.split(","):
            codec, dtype, size, chunks = DECODE_CASES[name]
            data = make_data(size)
            if dtype == np.uint8:
                data = (data >> 8).astype(np.uint8)
            for chunk in chunks:
                path = Path(tmp) / f"{name}-{chunk}.zarr"
                _decode_array(path, codec, data, chunk)
                runs: dict[str, Callable[[], None]] = {}
                pools: dict[str, ChunkPool] = {}
                try:
                    for mode in ("threads", "processes"):
                        runs[mode], pools[mode] = _decode_mode_run(path, data, mode)
                    wall, cpu = _paired_modes(runs, pools, args.rounds)
                finally:
                    for pool in pools.values():
                        pool.destroy()
                n = (size // chunk) ** 2
                per_chunk = {m: cpu[m] * 1e6 / (args.rounds * n) for m in cpu}
                q1, q2, q3 = ratio(wall["processes"], wall["threads"])
                label = f"{name}, {chunk}² {np.dtype(dtype).name}"
                print(
                    f"{label:28s} {n:6d}"
                    f" {statistics.median(wall['threads']) * 1000:10.1f}"
                    f" {statistics.median(wall['processes']) * 1000:9.1f}"
                    f"   {q2:5.2f} [{q1:.2f}..{q3:.2f}]"
                    f"            {per_chunk['threads']:7.0f} {per_chunk['processes']:5.0f}",
                    flush=True,
                )
                results.append((label, q2, (q1, q3)))
    q1, q2, q3 = two_process_ceiling(args.rounds)
    print(
        f"{'ceiling: bare codec, 2 procs/1':28s} {'':6s} {'':10s} {'':9s}"
        f"   {q2:5.2f} [{q1:.2f}..{q3:.2f}]   (the machine's limit now, for python-xor)",
        flush=True,
    )
    return results


# -- the cost of the per-chunk KPI log ---------------------------------------------------


def _with_log(pool: ChunkPool, run: Callable[[], None], log: KpiLog) -> Callable[[], None]:
    """``run`` with ``log`` as ``pool``'s KPI log; a round with a file ends when its
    records are handed to the writer process."""

    def logged_run() -> None:
        pool._kpis = log
        run()
        if log.path is not None:
            log.flush(wait=False)

    return logged_run


def kpi_overhead(argv: list[str] | None = None) -> list[tuple[str, float, tuple[float, float]]]:
    """``--kpi``: the pool's throughput with a KPI log file (every load's record written
    as a JSON line) over the same pool without one (records in memory only), in paired
    rounds of the same run (goal: >= 0.98); and the same pool against itself without a
    file (A/A), the method's own spread.

    One pool serves both sides: its log is swapped between rounds (``pool._kpis``, a
    :class:`KpiLog` with a path or one without, the two forms ``kpi_log`` takes), so
    that the only difference is the log. Two pools built alike differ by themselves:
    their IO threads settle on batch sizes from their own first measurements, and two
    identical pools, no log in either, measured 0.92 and 0.96 of each other at 256²
    chunks (15 paired rounds each), more than the 2% this is to resolve. A logged
    round ends when its last records are handed to the writer process: the process
    formats and writes the others (every ``FLUSH_EVERY``, 1024) while the round runs,
    on the same two cores, and the last ones, untimed, before the next round."""
    parser = argparse.ArgumentParser(description=kpi_overhead.__doc__)
    parser.add_argument("--kpi", action="store_true")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--chunks", default="128,256", help="chunk sizes, comma-separated")
    parser.add_argument("--size", type=int, default=8192, help="the array is size x size")
    args = parser.parse_args(argv)
    data = make_data(args.size)
    results = []
    print(f"pool with a KPI log file / without, {args.rounds} paired rounds, {args.size}² uint16")
    with tempfile.TemporaryDirectory(prefix="zarrscope-bench-kpi-") as tmp:
        for case in cases(Path(tmp), data, [int(c) for c in args.chunks.split(",")], ["unsharded"]):
            in_memory = KpiLog()  # what a pool without kpi_log=PATH keeps
            log = KpiLog(Path(tmp) / f"{case.chunk}.jsonl")
            run, destroy = pool_method(case, kpi_log=in_memory)
            pool = destroy.__self__

            plain, logged = _with_log(pool, run, in_memory), _with_log(pool, run, log)
            try:
                times, cpu = paired_rounds(
                    {"plain": plain, "logged": logged, "plain again": plain},
                    args.rounds,
                    after={"logged": log.flush},
                )
            finally:
                pool._kpis = in_memory
                destroy()
                log.close()
            per_chunk = {k: statistics.median(v) * 1e6 / len(case.keys) for k, v in cpu.items()}
            for label, side in ((case.label, "logged"), (f"{case.label}, A/A", "plain again")):
                q1, q2, q3 = ratio(times[side], times["plain"])
                print(
                    f"{label:33s} throughput ratio {q2:.3f} [{q1:.3f}..{q3:.3f}]   CPU µs/chunk "
                    f"{per_chunk['plain']:.0f} without, {per_chunk[side]:.0f} {side}",
                    flush=True,
                )
                results.append((label, q2, (q1, q3)))
    return results


if __name__ == "__main__":
    if "--decode-modes" in sys.argv[1:]:
        decode_modes(sys.argv[1:])
    elif "--kpi" in sys.argv[1:]:
        kpi_overhead(sys.argv[1:])
    else:
        main()


# -- the one-command run (python -m tests.benchmarks) ------------------------------------

#: Chunk sizes whose throughput should reach tensorstore's (issue 7 §5); none at 512².
TENSORSTORE_GOAL = {128: 1.0, 256: 1.0}


def throughput_figures(
    section: str,
    case: Case,
    times: dict[str, list[float]],
    cpu: dict[str, list[float]],
    note: str = "",
    goals: dict[int, float] = TENSORSTORE_GOAL,
) -> list[Figure]:
    """The figures of one case of :func:`run_case`: the pool's throughput (decoded MB/s)
    beside tensorstore's (``goals``: the ratio asked for, per chunk size) and raw
    read+decode's (ratio: pool over reference, per paired round), and the pool's CPU
    time per chunk beside tensorstore's."""
    from tests.benchmarks.figures import Figure, quartiles

    rounds = len(times["chunkpool"])
    mb = case.data.nbytes / 1e6
    n = len(case.keys)
    figures = []
    for ref, name in (("tensorstore", "tensorstore concurrent read"), ("raw", "raw threads")):
        q1, q2, q3 = ratio(times["chunkpool"], times[ref])
        figures.append(
            Figure(
                section,
                f"pool throughput, {case.label}",
                mb / statistics.median(times["chunkpool"]),
                "MB/s",
                name,
                mb / statistics.median(times[ref]),
                q2,
                (q1, q3),
                goals.get(case.chunk) if ref == "tensorstore" else None,
                True,
                rounds,
                note,
            )
        )
    per_round = np.array(cpu["chunkpool"]) / np.array(cpu["tensorstore"])
    figures.append(
        Figure(
            section,
            f"CPU per chunk, {case.label}",
            statistics.median(cpu["chunkpool"]) * 1e6 / n,
            "µs",
            "tensorstore",
            statistics.median(cpu["tensorstore"]) * 1e6 / n,
            float(np.median(per_round)),
            quartiles(list(per_round)),
            None,
            False,
            rounds,
            f"all threads of the process; raw threads {statistics.median(cpu['raw']) * 1e6 / n:.0f}"
            " µs",
        )
    )
    return figures


def collect(quick: bool = False) -> list[Figure]:
    """Pool throughput (local, unsharded and sharded, 128² to 512²) against tensorstore
    and raw threads, the KPI log's overhead and the decode modes, as figures."""
    from tests.benchmarks.figures import Figure

    size, rounds = (2048, 3) if quick else (8192, 9)
    threads = os.cpu_count() or 2
    figures: list[Figure] = []
    data = make_data(size)
    with tempfile.TemporaryDirectory(prefix="zarrscope-bench-") as tmp:
        for case in cases(Path(tmp), data, [128, 256, 512], ["unsharded", "sharded"]):
            times, cpu = run_case(case, rounds, threads)
            figures += throughput_figures(
                "pool throughput, local",
                case,
                times,
                cpu,
                f"{size}² uint16 zstd, page cache warm; raw: {threads} threads",
            )
            print(f"  {case.label}: {figures[-3].ratio:.2f} of tensorstore", flush=True)
    kpi_rounds = 5 if quick else 81  # (a 2% effect: rounds spread by ±8%, A/A 0.97-1.02 in 41)
    for label, q2, spread in kpi_overhead(["--rounds", str(kpi_rounds), "--size", str(size)]):
        control = label.endswith("A/A")
        figures.append(
            Figure(
                "pool overheads",
                f"KPI log, the same pool without it twice, {label[:-5]}"
                if control
                else f"KPI log file on / off, {label}",
                q2,
                "×",
                None,
                None,
                q2,
                spread,
                None if control else 0.98,
                True,
                kpi_rounds,
                "the method's own spread: no log on either side (no goal)"
                if control
                else "throughput with a KPI log file over without, one pool, its log swapped"
                " between rounds; a round ends when its records are handed to the writer"
                " process (issue 11 §1)",
            )
        )
    goals = {"zstd": 0.85, "blosc": 0.85, "python-xor": 1.6}
    codecs = "zstd,python-xor" if quick else ",".join(DECODE_CASES)
    decode_rounds = 1 if quick else 7
    for label, q2, spread in decode_modes(["--rounds", str(decode_rounds), "--codecs", codecs]):
        codec = label.split(",")[0]
        figures.append(
            Figure(
                "pool overheads",
                f"decode processes / threads, {label}",
                q2,
                "×",
                None,
                None,
                q2,
                spread,
                goals.get(codec),
                True,
                decode_rounds,
                "throughput with decode='processes' over decode='threads' (issue 9 §3)",
            )
        )
    return figures
