"""The benchmark suites still run: their smoke mode (tiny shapes, one round) end to end."""

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path: Path) -> None:
    env = dict(os.environ, OPSD_BENCH_SMOKE="1")
    raw = tmp_path / "smoke.json"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "bench/bench_divergence.py", f"--benchmark-json={raw}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = subprocess.run(
        [sys.executable, "bench/report.py", str(raw), "--out-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert report.returncode == 0, report.stdout[-4000:] + report.stderr[-4000:]
    written = {p.suffix for p in tmp_path.iterdir() if p.name != raw.name}
    assert {".json", ".md", ".png"} <= written, written


def test_bench_native_smoke(tmp_path: Path) -> None:
    """bench_native.py and its report (native peers skip, with the reason, if unbuilt)."""
    env = dict(os.environ, OPSD_BENCH_SMOKE="1")
    raw = tmp_path / "native.json"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "bench/bench_native.py", f"--benchmark-json={raw}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = subprocess.run(
        [sys.executable, "bench/report_native.py", str(raw), "--out-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert report.returncode == 0, report.stdout[-4000:] + report.stderr[-4000:]
    written = {p.suffix for p in tmp_path.iterdir() if p.name != raw.name}
    assert {".json", ".md", ".png"} <= written, written
