"""Throughput of ChunkPool against tensorstore and raw read+decode, in the same run.

Loads all 256 chunks (512 x 512) of an 8192 x 8192 uint16 zstd Zarr v3 array (page
cache warm) and reports the median of several repeats for each method, and the ratios
of their throughput to the pool's. Timings on shared machines are noisy: compare the
ratios, not the absolute numbers.

    python tests/benchmarks/bench_pool.py [--repeats 7] [--sharded]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
from numcodecs import Zstd

from chunkpool import ChunkPool

N, CHUNK = 8192, 512


def make_data(seed: int = 0) -> np.ndarray:
    """A smooth field plus blobs plus noise: compresses like real microscopy."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:N:64, 0:N:64] / N
    field = np.kron((np.sin(x * 12) + np.cos(y * 9) + 2.5) * 6000, np.ones((64, 64)))
    for _ in range(300):
        cy, cx = rng.integers(0, N, 2)
        r = int(rng.integers(10, 80))
        field[max(cy - r, 0) : cy + r, max(cx - r, 0) : cx + r] += 10000
    field += rng.normal(0, 300, (N, N))
    return field.clip(0, 65535).astype(np.uint16)


def write(path: Path, data: np.ndarray, sharded: bool) -> zarr.Array:
    shards = (2048, 2048) if sharded else None
    arr = zarr.create_array(
        path,
        shape=data.shape,
        chunks=(CHUNK, CHUNK),
        shards=shards,
        dtype=data.dtype,
        overwrite=True,
    )
    arr[:] = data
    return arr


def timings(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run of each method. The methods run round-robin, in a rotated
    order each round, so that drifts in the machine's load affect them alike."""
    for fn in methods.values():
        fn()  # warm-up (page cache, imports, thread start)
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sharded", action="store_true", help="2048² shards of 512² chunks")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="zarrscope-bench-"))
    data = make_data()
    write(tmp / "img.zarr", data, args.sharded)
    keys = [(i, j) for i in range(N // CHUNK) for j in range(N // CHUNK)]
    print(
        f"{len(keys)} chunks of {CHUNK}² uint16 ({data.nbytes / 1e6:.0f} MB decoded),"
        f" {'sharded 2048²' if args.sharded else 'unsharded'}, median of {args.repeats}"
    )

    (pool,) = ChunkPool.from_zarr_node(str(tmp / "img.zarr"))  # no cache: every run loads

    def run_pool() -> None:
        for idx in keys:
            pool.get_chunk(0, idx)
        pool.wait_for_chunks_to_load()
        for idx in keys:
            pool.drop_chunk(0, idx)

    def run_fresh_pool() -> None:
        (fresh,) = ChunkPool.from_zarr_node(str(tmp / "img.zarr"))
        for idx in keys:
            fresh.get_chunk(0, idx)
        fresh.wait_for_chunks_to_load()
        fresh.destroy()

    # check correctness once, so the numbers below are for real work
    for loc in [pool.get_chunk(0, idx, "check") for idx in keys[::37]]:
        assert np.array_equal(loc.wait(), data[loc.slices])
        pool.drop_chunk(0, loc.index, "check")

    import tensorstore as ts

    driver = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp / "img.zarr")}}
    ts_array = ts.open(driver).result()

    def run_tensorstore() -> None:
        reads = [
            ts_array[i * CHUNK : (i + 1) * CHUNK, j * CHUNK : (j + 1) * CHUNK].read()
            for i, j in keys
        ]
        for r in reads:
            r.result()

    zstd = Zstd()

    def read_decode(idx: tuple[int, int]) -> np.ndarray:
        raw = (tmp / "img.zarr" / "c" / str(idx[0]) / str(idx[1])).read_bytes()
        return np.frombuffer(zstd.decode(raw), np.uint16).reshape(CHUNK, CHUNK)

    def run_raw_threads() -> None:
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(read_decode, keys))

    async_arr = zarr.open_array(tmp / "img.zarr").async_array

    def run_zarr_gather() -> None:
        async def main() -> None:
            sem = asyncio.Semaphore(8)

            async def one(i: int, j: int) -> None:
                async with sem:
                    await async_arr.getitem(
                        (slice(i * CHUNK, (i + 1) * CHUNK), slice(j * CHUNK, (j + 1) * CHUNK))
                    )

            await asyncio.gather(*(one(i, j) for i, j in keys))

        asyncio.run(main())

    # 1. head to head: the pool and tensorstore alternate, nothing else runs between
    head = timings({"chunkpool": run_pool, "tensorstore": run_tensorstore}, args.repeats)
    print("head to head (alternating runs):")
    report(head)
    # 2. every method, round-robin
    methods = {
        "chunkpool": run_pool,
        "chunkpool, fresh pool each run": run_fresh_pool,
        "tensorstore": run_tensorstore,
        "zarr-python gather+Semaphore(8)": run_zarr_gather,
    }
    if not args.sharded:
        methods["raw read+zstd, 2 threads"] = run_raw_threads
    print("all methods (round-robin, rotated order):")
    report(timings(methods, args.repeats))
    pool.destroy()
    print(
        "(chunkpool: one pool, chunks dropped between runs, buffers recycled as in a "
        "viewer; fresh pool: new pool, threads and buffers each run)"
    )


def report(times: dict[str, list[float]]) -> None:
    """Median times, and the pool's throughput over each method's as the median and
    quartiles of the per-round ratios (paired, so load drifts cancel)."""
    pool_times = np.array(times["chunkpool"])
    print(f"  {'method':34s} {'median ms':>9s}   pool throughput / this: median [quartiles]")
    for name, t in times.items():
        q1, q2, q3 = np.percentile(np.array(t) / pool_times, [25, 50, 75])
        print(f"  {name:34s} {statistics.median(t) * 1000:9.1f}   {q2:5.2f} [{q1:.2f}..{q3:.2f}]")


if __name__ == "__main__":
    main()
