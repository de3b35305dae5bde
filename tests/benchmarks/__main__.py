"""The one-command benchmark run: ``python -m tests.benchmarks``.

    python -m tests.benchmarks [--quick] [--only bench_pool,bench_live] [--out DIR]
        [--peers-python PYTHON]

Runs the ``collect()`` of every module in :data:`MODULES` (or of ``--only`` ones), each
in a fresh child process (``python -m tests.benchmarks --child MODULE``: one module's
crash, hang or memory does not touch another; a failed module is published as failed,
with its error line, and the run goes on), records one jump of an offscreen viewer over
HTTP with 50 ms latency as a KPI log (also in a child), and writes into ``DIR``
(default ``tests/benchmarks/results/``):

- ``BENCHMARKS.md``: the date, the commit, the machine, the load, the command, a table
  of :class:`~tests.benchmarks.figures.Figure` per section, and the pictures;
- ``benchmarks.json``: the same, machine-readable; its ``"ratios"`` are what
  :func:`viewer.report.ratio_chart` draws;
- ``ratios.png`` (every ratio against its goal) and ``waterfall.png`` (where the time of
  the jump went, :func:`viewer.report.waterfall`), with the jump's ``kpi.jsonl``.

``--quick`` is the same code path with fewer repeats and smaller data, for a smoke test
(seconds per module), not for publishing. ``--rerun a,b`` measures those modules again
and publishes them with every other module's figures kept from the run already in
``DIR`` (each kept module says the date and commit it was measured at).
``--peers-python`` (or the environment's ``ZARRSCOPE_PEERS_PYTHON``) is the peers'
interpreter for ``bench_peers`` (default ``.peers-venv/bin/python`` in the clone;
without it that module publishes nothing).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.benchmarks.figures import Figure

ROOT = Path(__file__).resolve().parents[2]

#: Every benchmark module the run covers, in the order it publishes them.
MODULES = (
    "bench_pool",
    "bench_pool_http",
    "bench_viewer",
    "bench_sharp",
    "bench_motion",
    "bench_playback",
    "bench_link",
    "bench_live",
    "bench_session",
    "bench_tiling",
    "bench_peers",
)
#: Seconds a module's child may run (full run, quick run) before it is killed.
MODULE_TIMEOUT = {False: 1800.0, True: 300.0}
#: Seconds the recording of the waterfall's jump may take.
WATERFALL_TIMEOUT = 300.0
#: The packages whose versions describe the machine.
PACKAGES = ("zarr", "numpy", "pygfx", "wgpu", "tensorstore")
#: The viewer's size and the jump (a 1:1 view far from the fitted one) of the waterfall.
JUMP_SIZE = (1280, 800)
JUMP_AT = (9000, 11000)


@dataclass
class ModuleRun:
    """What one module's child gave: its figures, or the line saying why it failed."""

    module: str
    seconds: float
    figures: list[Figure] = field(default_factory=list)
    error: str | None = None
    #: Set when the figures were kept from an earlier run (``--rerun``): its date, commit.
    kept_from: str | None = None


# -- the child side ------------------------------------------------------------------------


def figure_from_json(data: dict[str, Any]) -> Figure:
    """The :class:`Figure` of one of ``benchmarks.json``'s (or a child's) figures."""
    fields = {k: v for k, v in data.items() if k not in ("met", "module")}
    if fields.get("spread") is not None:
        fields["spread"] = tuple(fields["spread"])
    return Figure(**fields)


def child(module: str, quick: bool, out: Path) -> int:
    """(In the child.) Run ``module``'s ``collect()``; write its figures to ``out``."""
    mod = importlib.import_module(f"tests.benchmarks.{module}")
    collect = getattr(mod, "collect", None)
    if not callable(collect):
        print(f"error: tests/benchmarks/{module}.py has no collect()", file=sys.stderr)
        return 2
    figures = collect(quick=quick)
    bad = [f for f in figures if not isinstance(f, Figure)]
    if bad:
        kind = type(bad[0]).__name__
        print(f"error: {module}.collect() returned a {kind}, not a Figure", file=sys.stderr)
        return 2
    out.write_text(json.dumps([f.to_json() for f in figures]))
    return 0


def record_jump(log: Path, png: Path) -> dict[str, Any]:
    """(In the child.) One jump of an offscreen viewer on the built-in sample, over the
    test HTTP server (in its own process) with 50 ms latency per request, to a fresh
    region at 1:1, frames drawn until it is settled, logged to ``log``; its waterfall
    drawn to ``png``. What the picture shows, for its caption."""
    import multiprocessing

    from chunkpool.kpi import read_kpi_lines
    from sample_data import ensure_sample
    from tests.benchmarks.bench_live import serve
    from viewer import Viewer
    from viewer.report import jumps, waterfall

    path = ensure_sample()
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    server = context.Process(target=serve, args=(str(path.parent), theirs), daemon=True)
    server.start()
    frame = threading.Event()
    try:
        if not ours.poll(60):
            raise TimeoutError("the test HTTP server did not start within 60 s")
        url = f"{ours.recv()}/{path.name}"
        viewer = Viewer(url, None, size=JUMP_SIZE, show_hud=False, kpi_log=log)
        try:
            if not viewer.wait_settled(120):
                raise TimeoutError("the fitted view did not settle within 120 s")
            viewer.screenshot()
            x0, y0 = JUMP_AT
            jumped = time.time()
            viewer.show_region(x0, y0, x0 + JUMP_SIZE[0], y0 + JUMP_SIZE[1])
            deadline = time.monotonic() + 120
            while True:  # a frame loop, as a window's: each frame logs what it drew
                viewer.screenshot()
                if viewer.settled():
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("the jump did not settle within 120 s")
                frame.wait(1 / 60)
            viewer.screenshot()
        finally:
            viewer.close()
    finally:
        ours.send(None)
        server.join(30)
    found = [j for j in jumps(read_kpi_lines(log)) if j.bars and j.start >= jumped]
    if not found:
        raise RuntimeError(f"the KPI log {log} has no loads after the jump")
    jump = max(found, key=lambda j: len(j.bars))
    waterfall(jump, png, title=f"one jump over HTTP (50 ms latency): {len(jump.bars)} loads")
    levels = sorted({bar.level for bar in jump.bars})
    return {
        "loads": len(jump.bars),
        "levels": levels,
        "milliseconds": round(jump.duration * 1e3, 1),
        "bytes": sum(bar.bytes_fetched for bar in jump.bars),
    }


# -- the parent side -----------------------------------------------------------------------


def run_child(args: list[str], timeout: float, label: str, env: dict[str, str]) -> tuple[int, str]:
    """Run ``python -m tests.benchmarks ARGS`` in a new session, its output echoed with
    ``label``; its exit status (-9 when killed after ``timeout`` s) and last line."""
    command = [sys.executable, "-m", "tests.benchmarks", *args]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own children are killed with it
    )
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    tail: collections.deque[str] = collections.deque(maxlen=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            print(f"  [{label}] {line}", flush=True)
            if line.strip():
                tail.append(line.strip())
        rc = proc.wait()
    finally:
        timer.cancel()
    if timed_out.is_set():
        return -9, f"killed after {timeout:.0f} s"
    return rc, tail[0] if tail else "(no output)"


def child_env(peers_python: Path | None) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    if peers_python is not None:
        env["ZARRSCOPE_PEERS_PYTHON"] = str(peers_python)
    return env


def run_module(module: str, quick: bool, env: dict[str, str], timeout: float) -> ModuleRun:
    """``module``'s figures, measured in a fresh child process."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zarrscope-bench-run-") as tmp:
        out = Path(tmp) / "figures.json"
        args = ["--child", module, "--figures", str(out), *(["--quick"] if quick else [])]
        rc, last = run_child(args, timeout, module, env)
        seconds = time.perf_counter() - started
        if rc != 0 or not out.exists():
            return ModuleRun(module, seconds, error=f"exit status {rc}: {last}")
        figures = [figure_from_json(f) for f in json.loads(out.read_text())]
    return ModuleRun(module, seconds, figures)


def machine() -> dict[str, Any]:
    """The machine the run is on: CPU, cores, memory, OS, Python, packages, GPU adapter."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram = float("nan")
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    probe = (
        "import json, wgpu; a = wgpu.gpu.request_adapter_sync(power_preference='high-performance')"
        "; print(json.dumps({k: a.info[k] for k in ('device', 'description', 'adapter_type',"
        " 'backend_type')}))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
        )
        info = json.loads(out.stdout.strip().splitlines()[-1])
        adapter = ", ".join(str(v) for v in info.values() if v)
    except (subprocess.TimeoutExpired, ValueError, IndexError) as error:
        adapter = f"unknown ({type(error).__name__})"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "wgpu_adapter": adapter,
    }


def commit(out: Path | None = None) -> str:
    """The checkout's commit, with ``dirty`` when its tree has uncommitted changes
    (other than in ``out``, where the run publishes)."""
    exclude = []
    if out is not None and out.resolve().is_relative_to(ROOT):
        exclude = ["--", ".", f":!{out.resolve().relative_to(ROOT)}"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", *exclude],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{sha} dirty" if status.strip() else sha


def ratio_name(figure: Figure) -> str:
    """The figure's bar in the ratio chart: its section, name and the reference's
    name (up to the reference's first colon)."""
    ref = f" / {figure.reference.split(':')[0]}" if figure.reference else ""
    return f"{figure.section}: {figure.name}{ref}"


def ratios(figures: list[Figure]) -> dict[str, dict[str, Any]]:
    """The ratio of every figure that has a goal, as :func:`viewer.report.ratio_chart`
    reads them (the figures published for information are in the tables only: with them
    the chart was some sixty bars, unreadable)."""
    return {
        ratio_name(f): {"ratio": f.ratio, "goal": f.goal, "higher_is_better": f.higher_is_better}
        for f in figures
        if f.goal is not None and f.ratio is not None and math.isfinite(f.ratio)
    }


def number(value: float | None) -> str:
    """A figure's value, with three significant digits and no exponent below 10⁶."""
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 0.001 else f"{value:.2e}"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(figures: list[Figure]) -> list[str]:
    """One section's figures as a markdown table."""
    lines = [
        "| figure | value | reference | ratio [quartiles] | goal | met | repeats | note |",
        "| --- | ---: | --- | ---: | ---: | :---: | ---: | --- |",
    ]
    for f in figures:
        reference = "—"
        if f.reference is not None:
            reference = f.reference
            if f.reference_value is not None:
                reference += f": {number(f.reference_value)} {f.unit}"
        ratio = number(f.ratio)
        if f.ratio is not None and f.spread is not None:
            ratio += f" [{number(f.spread[0])}–{number(f.spread[1])}]"
        goal = "—" if f.goal is None else f"{'≥' if f.higher_is_better else '≤'} {f.goal:g}"
        met = {True: "yes", False: "**no**", None: "—"}[f.met]
        row = [f.name, f"{number(f.value)} {f.unit}", reference, ratio, goal, met]
        lines.append("| " + " | ".join(cell(c) for c in [*row, str(f.repeats), f.note]) + " |")
    return lines


def markdown(run: dict[str, Any], modules: list[ModuleRun], pictures: dict[str, str]) -> str:
    """``BENCHMARKS.md``: the run's context, a table per section, the pictures
    (``pictures``: file name -> the line saying what it shows)."""
    m = run["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    lines = [
        "# zarrscope benchmarks",
        "",
        f"- date: {run['date']} (UTC)",
        f"- commit: {run['commit']}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {m['os']}",
        f"- Python {m['python']}; {packages}",
        f"- wgpu adapter: {m['wgpu_adapter']}",
        f"- load average (1, 5, 15 min) at start {run['load_start']}, at end {run['load_end']}",
        f"- duration: {run['seconds'] / 60:.1f} min",
        f"- command: `{run['command']}`",
        "",
        "Every ratio is against a reference measured in the same run (paired rounds where"
        " the module can); the quartiles are over the repeats. A failed module is listed as"
        " such and published nothing.",
        "",
        "| module | result | seconds |",
        "| --- | --- | ---: |",
    ]
    for mod in modules:
        result = f"**failed**: {mod.error}" if mod.error else f"{len(mod.figures)} figures"
        if mod.kept_from:
            result += f" (kept from the run of {mod.kept_from})"
        lines.append(f"| {mod.module} | {cell(result)} | {mod.seconds:.0f} |")
    sections: dict[str, list[Figure]] = {}
    for mod in modules:
        for f in mod.figures:
            sections.setdefault(f.section, []).append(f)
    for section, figures in sections.items():
        lines += ["", f"## {section}", "", *table(figures)]
    if pictures:
        lines += ["", "## Pictures"]
        for name, caption in pictures.items():
            lines += ["", f"![{name}]({name})", "", caption] if name else ["", caption]
    return "\n".join(lines) + "\n"


def publish(
    run: dict[str, Any], modules: list[ModuleRun], out: Path, waterfall: tuple[bool, str] | None
) -> Path:
    """Write ``benchmarks.json``, ``ratios.png`` and ``BENCHMARKS.md`` into ``out``.
    ``waterfall``: None when no jump was recorded, else whether ``waterfall.png`` is in
    ``out`` and its caption (or the line saying why it is not)."""
    from viewer.report import ratio_chart

    out.mkdir(parents=True, exist_ok=True)
    figures = [f for mod in modules for f in mod.figures]
    run = {
        **run,
        "modules": [
            {
                "module": m.module,
                "seconds": round(m.seconds, 1),
                "error": m.error,
                "kept_from": m.kept_from,
            }
            for m in modules
        ],
        "figures": [{"module": m.module, **f.to_json()} for m in modules for f in m.figures],
        "ratios": ratios(figures),
    }
    (out / "benchmarks.json").write_text(json.dumps(run, indent=1, ensure_ascii=False) + "\n")
    pictures = {}
    if run["ratios"]:
        ratio_chart(run, out / "ratios.png")
        pictures["ratios.png"] = (
            "Every ratio of the tables that has a goal, against its same-run reference"
            " (green: the goal met; red: missed; black tick: the goal; dashed: parity)."
        )
    if waterfall is not None:
        drawn, caption = waterfall
        pictures["waterfall.png" if drawn else ""] = caption
    path = out / "BENCHMARKS.md"
    path.write_text(markdown(run, modules, pictures))
    return path


def earlier_run(out: Path, exclude: list[str]) -> dict[str, ModuleRun]:
    """The modules of the run published in ``out`` (its ``benchmarks.json``) other than
    ``exclude``, each marked with that run's date and commit."""
    run = json.loads((out / "benchmarks.json").read_text())
    origin = f"{run['date']} at {run['commit']}"
    figures: dict[str, list[Figure]] = {}
    for data in run["figures"]:
        figures.setdefault(data["module"], []).append(figure_from_json(data))
    kept = {}
    for entry in run["modules"]:
        name = entry["module"]
        if name in exclude:
            continue
        kept[name] = ModuleRun(
            name,
            entry["seconds"],
            figures.get(name, []),
            entry["error"],
            entry.get("kept_from") or origin,
        )
    return kept


def kept_caption(out: Path) -> str:
    """The earlier run's waterfall caption, from its ``BENCHMARKS.md``."""
    lines = (out / "BENCHMARKS.md").read_text().splitlines()
    at = lines.index("![waterfall.png](waterfall.png)")
    return lines[at + 2] + " (kept from the earlier run)"


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller data")
    parser.add_argument("--only", default=None, help="comma-separated modules (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "benchmarks" / "results")
    parser.add_argument("--peers-python", type=Path, default=None, help="the peers' python")
    parser.add_argument("--no-waterfall", action="store_true", help="do not record the jump")
    parser.add_argument(
        "--rerun",
        default=None,
        help="comma-separated modules to measure again; the others keep their figures from "
        "the run already published in --out",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--figures", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-waterfall", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not os.environ.get("XDG_RUNTIME_DIR"):
        # as a desktop session has one: else Mesa's Vulkan loader says on stderr, in
        # every process that renders, that it is invalid (lines that look like errors)
        with tempfile.TemporaryDirectory(prefix="zarrscope-runtime-") as runtime:
            os.chmod(runtime, 0o700)
            os.environ["XDG_RUNTIME_DIR"] = runtime
            try:
                return execute(args, parser, argv)
            finally:
                del os.environ["XDG_RUNTIME_DIR"]
    return execute(args, parser, argv)


def execute(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """The run itself (or a child's part of it), as :func:`main` parsed it."""
    if args.child is not None:
        return child(args.child, args.quick, args.figures)
    if args.child_waterfall is not None:
        out = args.child_waterfall
        print(json.dumps(record_jump(out / "kpi.jsonl", out / "waterfall.png")))
        return 0

    if args.only is not None and args.rerun is not None:
        parser.error("--only and --rerun do not go together")
    chosen = args.rerun if args.rerun is not None else args.only
    modules = list(MODULES) if chosen is None else chosen.split(",")
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module {unknown[0]!r}; the modules are {', '.join(MODULES)}")
    kept: dict[str, ModuleRun] = {}
    if args.rerun is not None:
        try:
            kept = earlier_run(args.out, exclude=modules)
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"--rerun needs the run published in {args.out}: {err}")
    started, load_start = time.perf_counter(), load()
    context: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "commit": commit(args.out),
        "machine": machine(),
        "command": shlex.join(["python", "-m", "tests.benchmarks", *argv]),
        "load_start": load_start,
    }
    print(f"zarrscope benchmarks at {context['commit']}, load {load_start}", flush=True)
    env = child_env(args.peers_python)
    results = []
    for k, module in enumerate(modules, 1):
        print(f"[{k}/{len(modules)}] {module} ...", flush=True)
        result = run_module(module, args.quick, env, MODULE_TIMEOUT[args.quick])
        results.append(result)
        verdict = f"failed: {result.error}" if result.error else f"{len(result.figures)} figures"
        print(f"[{k}/{len(modules)}] {module}: {verdict} in {result.seconds:.0f} s", flush=True)
    waterfall = None
    if not args.no_waterfall:
        print("recording one jump for the waterfall ...", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        for stale in ("kpi.jsonl", "waterfall.png"):
            (args.out / stale).unlink(missing_ok=True)
        rc, last = run_child(["--child-waterfall", str(args.out)], WATERFALL_TIMEOUT, "jump", env)
        if rc == 0 and (args.out / "waterfall.png").exists():
            jump = json.loads(last)
            waterfall = (
                True,
                (
                    f"One jump of an offscreen {JUMP_SIZE[0]} x {JUMP_SIZE[1]} viewer on the"
                    f" built-in sample over the test HTTP server with 50 ms latency per request, to"
                    f" a fresh region at 1:1 ({JUMP_AT[0]}, {JUMP_AT[1]}): a bar per chunk of its"
                    f" {jump['loads']} loads (levels {', '.join(map(str, jump['levels']))};"
                    f" {jump['bytes'] / 1e6:.1f} MB fetched), from request to first frame"
                    f" on screen, {jump['milliseconds']:.0f} ms to the last (from kpi.jsonl)."
                ),
            )
        else:
            waterfall = False, f"The waterfall's jump failed: exit status {rc}: {last}"
            print(waterfall[1], flush=True)
    context["load_end"] = load()
    context["seconds"] = round(time.perf_counter() - started, 1)
    if kept:  # the published order, measured or kept
        measured = {r.module: r for r in results}
        results = [measured.get(m) or kept[m] for m in MODULES if m in measured or m in kept]
        if waterfall is None and (args.out / "waterfall.png").exists():
            waterfall = True, kept_caption(args.out)
    path = publish(context, results, args.out, waterfall)
    failed = [r.module for r in results if r.error]
    print(f"wrote {path} ({len(failed)} failed: {', '.join(failed) or 'none'})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
