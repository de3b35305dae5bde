"""The one-command benchmark run (``python -m tests.benchmarks``): what it publishes.

The writer is checked on synthetic figures (tables, verdicts, the JSON that the ratio
chart reads, a failed module shown as failed); the child-process path with real
modules: one that has no ``collect()`` (a failure, reported and survived) and one
whole ``--quick`` run of the cheapest module (``bench_peers`` without the peers'
interpreter: it publishes nothing, with its note line, in a second or two).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.__main__ import (
    MODULES,
    ModuleRun,
    child_env,
    figure_from_json,
    main,
    publish,
    run_module,
)
from tests.benchmarks.figures import Figure
from viewer.report import ratio_chart

ROOT = Path(__file__).resolve().parents[1]

MET = Figure("speed", "pool at 256²", 120.0, "MB/s", "tensorstore", 100.0, 1.2, (1.1, 1.3), 1.0)
MISSED = Figure(
    "speed", "pool at 128²", 80.0, "MB/s", "tensorstore", 100.0, 0.8, (0.7, 0.9), 1.0, repeats=9
)
LOWER = Figure(
    "latency",
    "write to screen | p90",
    300.0,
    "ms",
    "goal",
    400.0,
    0.75,
    None,
    1.0,
    higher_is_better=False,
    repeats=20,
    note="a | pipe",
)
INFO = Figure("latency", "bookkeeping", 0.25, "ms", note="no reference")
RUN = {
    "date": "2026-01-01 00:00",
    "commit": "abc123 dirty",
    "machine": {
        "cpu": "a CPU",
        "cores": 2,
        "ram_gib": 8.0,
        "os": "Linux",
        "python": "3.11",
        "packages": {"zarr": "3", "numpy": "2", "pygfx": "0.17", "wgpu": "0.3", "tensorstore": "0"},
        "wgpu_adapter": "llvmpipe",
    },
    "command": "python -m tests.benchmarks --quick",
    "load_start": "1.00, 1.00, 1.00",
    "load_end": "2.00, 2.00, 2.00",
    "seconds": 90.0,
}


def rows(markdown: str, name: str) -> list[list[str]]:
    """The cells of the table rows whose first cell is ``name``."""
    found = []
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and cells[0] == name:
            found.append(cells)
    return found


def test_published_tables_verdicts_and_json(tmp_path):
    modules = [
        ModuleRun("bench_pool", 12.0, [MET, MISSED]),
        ModuleRun("bench_crash", 3.0, error="exit status 1: RuntimeError: boom"),
        ModuleRun("bench_live", 30.0, [LOWER, INFO]),
    ]
    path = publish(RUN, modules, tmp_path, (False, "The waterfall's jump failed: exit 1"))
    md = path.read_text()
    for expected in ("abc123 dirty", "a CPU, 2 cores, 8.0 GiB", "llvmpipe", "1.5 min"):
        assert expected in md
    assert "`python -m tests.benchmarks --quick`" in md
    assert md.index("## speed") < md.index("## latency")  # sections in the modules' order
    assert rows(md, "bench_crash") == [
        ["bench_crash", "**failed**: exit status 1: RuntimeError: boom", "3"]
    ]
    assert rows(md, "bench_pool")[0][1] == "2 figures"
    (met,) = rows(md, "pool at 256²")
    assert met[1:7] == ["120 MB/s", "tensorstore: 100 MB/s", "1.2 [1.1–1.3]", "≥ 1", "yes", "1"]
    assert rows(md, "pool at 128²")[0][5:7] == ["**no**", "9"]
    (lower,) = rows(md, "write to screen \\| p90")  # a pipe in a cell does not split it
    assert lower[3:6] == ["0.75", "≤ 1", "yes"] and lower[-1] == "a \\| pipe"
    assert rows(md, "bookkeeping")[0][2:6] == ["—", "—", "—", "—"]
    assert "![ratios.png](ratios.png)" in md and "![waterfall.png]" not in md
    assert "The waterfall's jump failed: exit 1" in md

    data = json.loads((tmp_path / "benchmarks.json").read_text())
    assert [m["error"] for m in data["modules"]] == [
        None,
        "exit status 1: RuntimeError: boom",
        None,
    ]
    assert [figure_from_json(f) for f in data["figures"]] == [MET, MISSED, LOWER, INFO]
    assert [f["met"] for f in data["figures"]] == [True, False, True, None]
    assert data["ratios"] == {
        "speed: pool at 256² / tensorstore": {"ratio": 1.2, "goal": 1.0, "higher_is_better": True},
        "speed: pool at 128² / tensorstore": {"ratio": 0.8, "goal": 1.0, "higher_is_better": True},
        "latency: write to screen | p90 / goal": {
            "ratio": 0.75,
            "goal": 1.0,
            "higher_is_better": False,
        },
    }
    assert ratio_chart(data, tmp_path / "again.png").stat().st_size > 0
    assert (tmp_path / "ratios.png").stat().st_size > 0


def test_a_module_without_collect_fails_alone():
    # bench_remote is a benchmark script that the run does not cover: no collect()
    result = run_module("bench_remote", True, child_env(None), timeout=120)
    assert result.figures == []
    assert result.error == "exit status 2: error: tests/benchmarks/bench_remote.py has no collect()"


def test_unknown_module_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--only", "bench_pool,bench_nope"])
    assert exit_.value.code == 2
    assert "unknown module 'bench_nope'" in capsys.readouterr().err


def test_quick_run_through_the_child(tmp_path):
    assert "bench_peers" in MODULES
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missing = tmp_path / "no-peers" / "python"
    options = ["--no-waterfall", "--out", str(tmp_path / "run"), "--peers-python", str(missing)]
    out = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks", "--quick", "--only", "bench_peers", *options],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"[bench_peers] bench_peers: no peers' python at {missing}" in out.stdout
    assert "[1/1] bench_peers: 0 figures" in out.stdout
    md = (tmp_path / "run" / "BENCHMARKS.md").read_text()
    assert rows(md, "bench_peers")[0][1] == "0 figures"
    assert "--peers-python" in md
    data = json.loads((tmp_path / "run" / "benchmarks.json").read_text())
    assert data["figures"] == [] and data["ratios"] == {}
    assert data["modules"][0]["module"] == "bench_peers"


def test_a_rerun_measures_its_modules_again_and_keeps_the_others(tmp_path):
    """``--rerun bench_peers``: bench_peers is measured again (here: nothing, no peers'
    python), bench_pool's figures stay those of the run already published, marked as
    kept from it, and the modules keep the published order."""
    out = tmp_path / "run"
    earlier = [ModuleRun("bench_pool", 12.0, [MET, MISSED]), ModuleRun("bench_peers", 5.0, [INFO])]
    publish(RUN, earlier, out, None)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    options = ["--no-waterfall", "--out", str(out), "--peers-python", str(tmp_path / "none")]
    result = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks", "--quick", "--rerun", "bench_peers", *options],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((out / "benchmarks.json").read_text())
    assert [(m["module"], m["kept_from"]) for m in data["modules"]] == [
        ("bench_pool", "2026-01-01 00:00 at abc123 dirty"),
        ("bench_peers", None),
    ]
    assert [figure_from_json(f) for f in data["figures"]] == [MET, MISSED]
    md = (out / "BENCHMARKS.md").read_text()
    assert rows(md, "bench_pool")[0][1] == (
        "2 figures (kept from the run of 2026-01-01 00:00 at abc123 dirty)"
    )
    assert rows(md, "bench_peers")[0][1] == "0 figures"


def test_a_rerun_needs_a_published_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--rerun", "bench_peers", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "--rerun needs the run published in" in capsys.readouterr().err
