"""The benchmark suites still run: their smoke mode (tiny shapes, one round) end to end, then
their report (peers that cannot run here skip, with the reason)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], **kwargs) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, **kwargs)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("suite, report", [("bench_divergence", "report"),
                                           ("bench_native", "report_native")])
def test_bench_smoke(tmp_path: Path, suite: str, report: str) -> None:
    raw = tmp_path / f"{suite}.json"
    _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", f"bench/{suite}.py",
          f"--benchmark-json={raw}"], env=dict(os.environ, OPSD_BENCH_SMOKE="1"))
    _run([f"bench/{report}.py", str(raw), "--out-dir", str(tmp_path)])
    written = {p.suffix for p in tmp_path.iterdir() if p.name != raw.name}
    assert {".json", ".md", ".png"} <= written, written
