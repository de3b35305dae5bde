"""Per-chunk KPI records: the log's bounds and format, and the report drawn from it."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import time

import numpy as np
import pytest
import zarr
from conftest import make_array, ramp
from support.teststores import GatedStore

from chunkpool import ChunkLoadError, kpi, kpiwriter
from chunkpool.kpi import LINES_PER_WRITE, KpiLog, LoadRecord, read_kpi_lines
from viewer import report


def record(level: int, i: int, t: float, state: str = "loaded") -> LoadRecord:
    return LoadRecord(
        "img.zarr", level, (0, i), state, 100, 400, t, t + 0.001, t + 0.002, t + 0.003, t + 0.004
    )


def test_the_ring_keeps_the_newest_and_the_percentiles_come_from_it() -> None:
    log = KpiLog(capacity=10)
    assert np.isnan(log.latency_percentiles()).all()
    t = time.perf_counter()
    for i in range(25):
        log.add(record(0, i, t))
    kept = log.records()
    assert [r.index[1] for r in kept] == list(range(15, 25))
    assert log.latency_percentiles((50,)) == pytest.approx((0.004,))


def test_the_file_is_rotated_within_its_bound_and_reads_back_in_order(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "kpi.jsonl"
    log = KpiLog(path, max_bytes=64 << 10, backups=2)
    t = time.perf_counter()
    n = 20 * LINES_PER_WRITE
    for i in range(n):
        log.add(record(i % 3, i, t + i))
    log.event("view", when=t, center=(1.0, 2.0), zoom=np.float32(0.5))
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["kpi.jsonl", "kpi.jsonl.1", "kpi.jsonl.2"]
    batch = max(len(line) for line in path.read_text().splitlines()) * LINES_PER_WRITE
    assert all((tmp_path / f).stat().st_size <= (64 << 10) + batch for f in files)
    lines = read_kpi_lines(path)
    loads = [line for line in lines if line["event"] == "load"]
    assert loads and loads[-1]["index"] == [0, n - 1]  # the newest kept, oldest dropped
    assert [x["index"][1] for x in loads] == sorted(x["index"][1] for x in loads)
    first = loads[0]
    assert first["state"] == "loaded" and first["bytes_decoded"] == 400
    assert first["fetched"] - first["fetch_started"] == pytest.approx(1000, abs=2)  # µs
    wall = first["requested"] * 1e-6
    assert abs(wall - (time.time() + first["index"][1] - (time.perf_counter() - t))) < 5
    (view,) = [line for line in lines if line["event"] == "view"]
    assert view["center"] == [1.0, 2.0] and view["zoom"] == 0.5


def test_records_and_events_are_written_in_the_order_they_came(tmp_path: pathlib.Path) -> None:
    """Records go to the writer as columns, a run at a time, events between them."""
    path = tmp_path / "kpi.jsonl"
    log = KpiLog(path)
    t = time.perf_counter()
    expected = []
    for i in range(40):
        if i % 7 == 3:
            log.event("drawn", when=t + i, source="img.zarr", level=0, index=[0, i])
            expected.append(("drawn", i))
        else:
            log.add(record(0, i, t + i))
            expected.append(("load", i))
        if i == 20:
            log.flush()  # two frames: a record-only run may start either
    log.close()
    assert [(line["event"], line["index"][1]) for line in read_kpi_lines(path)] == expected


# strings as orjson escapes them: quotes, backslashes, every control character, UTF-8
AWKWARD = ["img.zarr", 'a"b\\c', "".join(map(chr, range(32))) + "\x7f", "données ✓ 𝄞", ""]


def _awkward_records() -> list[LoadRecord]:
    return [
        LoadRecord(
            text or "x", i, (0, i, -i), "loaded", i * 7, 1 << 40, 1000.0 + i * 1e-5,
            None if i % 2 else 1000.25, 0.0, None, 1e6 + i, text or None,
        )
        for i, text in enumerate(AWKWARD)
    ]  # fmt: skip


@pytest.mark.skipif(not kpiwriter.NATIVE_LINES, reason="chunkpool._kpilines not built")
def test_the_c_formatter_writes_orjsons_bytes() -> None:
    """Load records formatted in C are byte for byte those of the Python formatter
    (orjson), for awkward strings, big and negative integers and missing steps; a run
    with a value it leaves alone (a bool, a numpy integer, a lone surrogate) is
    formatted in Python, the same bytes again."""
    writer = kpiwriter.LineWriter.__new__(kpiwriter.LineWriter)  # (no file: lines only)
    writer._epoch_us = 1764643012000000
    records = _awkward_records()
    columns = kpi._as_columns(records)[0]
    python = [writer._load_line(r) for r in records]
    assert kpiwriter._kpilines.load_lines(writer._epoch_us, columns).split(b"\n") == python
    assert writer._load_lines(columns).split(b"\n") == python
    for odd in [
        records[0]._replace(level=True),
        records[0]._replace(index=(np.int64(3), 1)),
        records[0]._replace(error="\ud800"),
    ]:
        odd_columns = kpi._as_columns([odd])[0]
        with pytest.raises((TypeError, ValueError)):
            kpiwriter._kpilines.load_lines(writer._epoch_us, odd_columns)
        if odd.error == "\ud800":
            continue  # (orjson refuses it too: the Python formatter's rule)
        assert writer._load_lines(odd_columns) == writer._load_line(odd)
        assert json.loads(writer._load_lines(odd_columns))["level"] == odd.level


def test_a_line_cut_short_is_skipped(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "kpi.jsonl"
    log = KpiLog(path)
    log.add(record(0, 1, time.perf_counter()))
    log.close()
    with path.open("a") as f:
        f.write('{"event": "load", "sou')
    assert [line["index"] for line in read_kpi_lines(path)] == [[0, 1]]


def test_the_report_splits_jumps_and_draws_a_waterfall(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "kpi.jsonl"
    log = KpiLog(path)
    t = time.perf_counter()
    log.event("view", when=t)
    for i in range(5):
        log.add(record(1, i, t + 0.01 * i))
        log.event("drawn", when=t + 0.01 * i + 0.01, source="img.zarr", level=1, index=[0, i])
    log.add(record(0, 9, t + 0.2, state="cancelled")._replace(decoded=None, delivered=None))
    log.event("view", when=t + 1.0)
    log.add(record(0, 7, t + 1.1))
    log.close()
    jumps = report.jumps(read_kpi_lines(path))
    assert [len(j.bars) for j in jumps] == [6, 1]
    first = jumps[0].bars[0]
    assert first.times["requested"] == pytest.approx(0.0, abs=1e-5)
    assert first.times["drawn"] == pytest.approx(0.01, abs=1e-5)
    cancelled = jumps[0].bars[-1]
    assert cancelled.state == "cancelled" and cancelled.times["drawn"] is None
    assert jumps[1].bars[0].times["drawn"] is None  # never drawn
    out = tmp_path / "w.png"
    ratios = tmp_path / "benchmarks.json"
    ratios.write_text(json.dumps({"ratios": {"a": {"ratio": 1.2, "goal": 1.0}}}))
    assert report.main([str(path), "-o", str(out), "--ratios", str(ratios)]) == 0
    from PIL import Image

    assert Image.open(out).size[0] == 1000
    assert Image.open(out.with_suffix(".ratios.png")).size[0] == 900


def test_the_report_says_one_line_for_a_missing_or_empty_log(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report.main([str(tmp_path / "none.jsonl")]) == 2
    (tmp_path / "empty.jsonl").write_text("")
    assert report.main([str(tmp_path / "empty.jsonl")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("zarrscope-report: ") for line in err)


def test_a_pool_records_every_load_loaded_failed_and_cancelled(pools, tmp_path) -> None:
    """Each load leaves one record, in memory and in the pool's log file, with its
    steps in time order; a cancelled one stops where it was; destroy() closes the
    file and stops the writer thread (the fixture checks no chunkpool thread is left)."""
    data = ramp((40, 40))
    make_array(tmp_path / "a.zarr", data, (20, 20))
    (tmp_path / "a.zarr" / "c" / "1" / "0").write_bytes(b"this is not zstd")
    arr = zarr.open_array(GatedStore(zarr.storage.LocalStore(tmp_path / "a.zarr")), mode="r")
    path = tmp_path / "kpi.jsonl"
    pool = pools(arr, kpi_log=path)
    for index in [(0, 0), (0, 1), (1, 0)]:
        pool.get_chunk(0, index)
    with pytest.raises(ChunkLoadError):
        pool.wait_for_chunks_to_load(timeout=60)
    arr.store.rec.hold()
    pool.get_chunk(0, (1, 1))
    arr.store.rec.wait_started(4, timeout=60)  # it is being read: cancelled mid-fetch
    pool.drop_chunk(0, (1, 1))
    arr.store.rec.open_gate()
    by_index = {r.index: r for r in pool.kpis.records()}
    assert {i: r.state for i, r in by_index.items()} == {
        (0, 0): "loaded",
        (0, 1): "loaded",
        (1, 0): "failed",
        (1, 1): "cancelled",
    }
    loaded = by_index[(0, 0)]
    assert loaded.bytes_decoded == 20 * 20 * 2 and 0 < loaded.bytes_fetched < 800
    steps = [loaded.requested, loaded.fetch_started, loaded.fetched, loaded.decoded]
    assert steps == sorted(steps) and loaded.delivered >= loaded.decoded
    assert "ChunkDecodeError" in by_index[(1, 0)].error or "zstd" in by_index[(1, 0)].error
    assert by_index[(1, 1)].delivered is None and by_index[(1, 1)].decoded is None
    assert pool.stats.latency_p50 > 0
    pool.destroy()
    lines = [line for line in read_kpi_lines(path) if line["event"] == "load"]
    assert sorted(tuple(x["index"]) for x in lines) == sorted(by_index)
    assert all(x["source"] == "test" and x["level"] == 0 for x in lines)
    if kpiwriter.NATIVE_LINES:  # every value of a pool's records is one C formats
        columns = kpi._as_columns(pool.kpis.records())[0]
        kpiwriter._kpilines.load_lines(0, columns)


@pytest.mark.render
def test_the_viewer_logs_views_loads_and_first_draws(tmp_path: pathlib.Path) -> None:
    """``Viewer(kpi_log=PATH)``: its pools' loads, each view it showed and, for
    each chunk drawn, the frame that first drew it (after the chunk was delivered);
    the report draws the jump."""
    from support.images import noise_image, write_pyramid
    from test_render import settle

    from viewer import Viewer

    picture = noise_image((256, 256), seed=3)
    pyramid = write_pyramid(tmp_path / "p.ome.zarr", picture, chunks=(64, 64), n_levels=2)
    path = tmp_path / "kpi.jsonl"
    viewer = Viewer(
        str(pyramid.path),
        None,
        size=(128, 128),
        colormap="gray",
        clim=(0, 255),
        show_hud=False,
        kpi_log=path,
    )
    try:
        viewer.show_region(64, 64, 192, 192)
        shot = settle(viewer)
        assert (shot[..., 0] == picture[64:192, 64:192]).all()
    finally:
        viewer.close()
    lines = read_kpi_lines(path)
    loads = {(x["level"], tuple(x["index"])): x for x in lines if x["event"] == "load"}
    drawn = [x for x in lines if x["event"] == "drawn"]
    assert any(x["event"] == "view" for x in lines)
    assert {(0, (1, 1)), (0, (2, 2))} <= {(x["level"], tuple(x["index"])) for x in drawn}
    for x in drawn:
        load = loads[(x["level"], tuple(x["index"]))]
        assert load["state"] == "loaded" and x["time"] >= load["delivered"]
    out = tmp_path / "w.png"
    assert report.main([str(path), "-o", str(out)]) == 0 and out.stat().st_size > 0


def _writer_pid(log: KpiLog) -> int:
    assert log._process is not None  # the file is written by the log's own process
    return log._process.pid


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_lines_are_written_by_a_process_that_close_ends(tmp_path: pathlib.Path) -> None:
    """The file is the writer process's (formatting in a thread of the pool's process
    took the GIL from its loading threads); flush() returns once the lines are in the
    file, and close() ends the process."""
    path = tmp_path / "kpi.jsonl"
    log = KpiLog(path)
    pid = _writer_pid(log)
    t = time.perf_counter()
    for i in range(10):
        log.add(record(0, i, t))
    log.flush()
    assert [x["index"][1] for x in read_kpi_lines(path)] == list(range(10))
    log.close()
    assert _gone(pid)


@pytest.mark.parametrize("fault", ["killed", "stuck", "stuck, pipe full"])
def test_a_writer_process_that_dies_or_hangs_hands_the_file_to_the_log(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    """A writer process killed (or stopped: it never answers) costs at most the batch
    in flight: the log says so in one warning, writes the file itself from then on,
    and close() still returns, with no process left."""
    monkeypatch.setattr(kpi, "CLOSE_TIMEOUT", 0.5)  # how long a flush waits for an answer
    path = tmp_path / "kpi.jsonl"
    log = KpiLog(path)
    pid = _writer_pid(log)
    t = time.perf_counter()
    log.add(record(0, 0, t))
    log.flush()
    os.kill(pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    with caplog.at_level(logging.WARNING, logger="chunkpool"):
        # (a batch larger than the pipe holds, ~70 bytes a record: a send that would
        # block for good)
        for _ in range(kpiwriter.PIPE_BYTES // 40 if fault == "stuck, pipe full" else 1):
            log.add(record(0, 1, t))
        log.flush()  # the process is found dead or silent here
        log.add(record(0, 2, t))
        log.flush()
        log.close()
    warnings = [r.getMessage() for r in caplog.records if "writing it in this process" in r.message]
    assert len(warnings) == 1 and str(path) in warnings[0]
    assert ("killed by SIGKILL" in warnings[0]) == (fault == "killed")
    indexes = [x["index"][1] for x in read_kpi_lines(path)]
    assert indexes[0] == 0 and indexes[-1] == 2 and set(indexes) <= {0, 1, 2}
    assert log._process is None and _gone(pid)
