"""The README's example runs as written, and CI runs the README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs(tmp_path):
    section = README[README.index("## chunkpool in a few lines") :]
    example = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    script = tmp_path / "example.py"
    script.write_text(example.replace("/tmp/demo.zarr", str(tmp_path / "demo.zarr")))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "loaded (0, (3, 3)) (232, 232)" in out.stdout


def test_ci_runs_the_readme_test_command():
    marker = README.index("<!-- test-command -->")
    (command,) = re.findall(r"```sh\n(.*?)\n```", README[marker:], flags=re.S)[:1]
    # run the awk program .ci/run uses and compare what it finds with the README block
    awk = re.search(r"cmd=\$\((awk .*)\)\n", (ROOT / ".ci" / "run").read_text()).group(1)
    got = subprocess.run(["bash", "-c", awk], cwd=ROOT, capture_output=True, text=True)
    assert got.stdout.strip() == command.strip()
    assert "pytest" in command and "pip install" in command


def test_readme_viewer_example_runs(tmp_path):
    section = README[README.index("## The viewer from Python") :]
    example = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    script = tmp_path / "viewer_example.py"
    script.write_text(example.replace("/tmp/", f"{tmp_path}/"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
