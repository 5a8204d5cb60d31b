"""bench/gpu_check.py (`make gpu-check`) on a machine without a GPU: it refuses in one line,
its arguments are checked, and its dry run goes through every step (the wheels installed, the
build, the test selections, the benchmarks at smoke shapes, the results written), so that the
first run on a GPU does not die on a typo. The benchmark of the prefix forward is left to
test_prefix.py's smoke test."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))
import gpu_check  # noqa: E402

SCRIPT = [sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py")]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*SCRIPT, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_refuses_without_a_gpu_in_one_line() -> None:
    proc = _run()
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: "), proc.stderr
    assert "CUDA" in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_unknown_step_is_named() -> None:
    proc = _run("--steps", "build,bogus")
    assert proc.returncode == 2 and "--steps" in proc.stderr and "bogus" in proc.stderr


def _tiny_wheel(folder: Path) -> Path:
    """A valid pure-Python wheel of a one-module distribution."""
    folder.mkdir(parents=True)
    path = folder / "opsd_probe_peer-1.0-py3-none-any.whl"
    info = "opsd_probe_peer-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr("opsd_probe_peer.py", "VALUE = 42\n")
        whl.writestr(f"{info}/METADATA",
                     "Metadata-Version: 2.1\nName: opsd-probe-peer\nVersion: 1.0\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                      "Root-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    return path


@pytest.mark.slow
def test_dry_run_goes_through_every_step(tmp_path: Path) -> None:
    wheel = _tiny_wheel(tmp_path / "wheels")
    out = tmp_path / "out"
    proc = _run("--dry-run", "--wheels", str(wheel.parent), "--out", str(out),
                "--steps", "peers,build,tests,divergence,cuda_rows", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu-check.json").read_text())
    assert result["dry_run"] and result["machine"]["commit"]
    steps = {s["name"]: s for s in result["steps"]}
    assert steps["peers"]["data"]["wheels"] == [wheel.name]
    assert steps["build"]["status"] == "ok"
    assert steps["tests"]["data"]["gpu-marked"]["collected"] > 0
    assert steps["tests"]["data"]["kernel suites"]["collected"] > 0
    assert steps["divergence"]["status"] == "ok"
    report = steps["divergence"]["data"]["report"]
    assert {Path(name).suffix for name in report} == {".md", ".json", ".png"}
    assert all((out / name).stat().st_size > 0 for name in report)
    assert steps["cuda_rows"]["status"] == "skipped"  # no CUDA device: said, not crashed
    summary = (out / "gpu-check.md").read_text()
    assert "dry run" in summary and result["machine"]["commit"] in summary
    log = (out / "gpu-check.log").read_text()
    assert "setup.py" in log and "--collect-only" in log


def test_summary_of_a_gpu_run_from_fake_timings() -> None:
    """The parts of the summary only a GPU run fills (row-kernel bandwidth, prefix speed-ups,
    targets), from made-up numbers."""
    info = {"gpu": "NVIDIA H200", "capability": "sm_90", "commit": "abc123"}
    steps = [
        gpu_check.Step("tests", "ok", 80.0, "gpu-marked: 176 passed, 0 failed, 0 skipped"),
        gpu_check.Step("divergence", "ok", 120.0, "40 timings", data={
            "report": ["nvidia-h200-2026-12-02.md", "nvidia-h200-2026-12-02.png"],
            "targets": ["jsd N=16384: opsd_triton time / Liger = 0.410 (PASS)"],
            "skipped": ["liger_chunked: ImportError"]}),
        gpu_check.Step("prefix", "ok", 50.0, "student 2.10x", data={"rows": [
            {"case": "qwen3-1.7b", "role": "student", "speedup": 2.1, "peak_vs_plain": 0.4,
             "hidden_rel_err_vs_plain": 3e-3, "tokens": 9216}]}),
        gpu_check.Step("cuda_rows", "ok", 20.0, "8 timings", data={
            "rows": [{"peer": "cuda", "case": "jsd", "dtype": "float32", "achieved_gbps": 3100.0,
                      "median_s": 0.0021}],
            "targets": {"values": {"jsd/float32/of_copy_bandwidth": 0.75}, "failed": []}}),
    ]
    md = gpu_check.summary_markdown(info, steps, dry_run=False)
    assert "dry run" not in md
    assert "| gpu | NVIDIA H200 |" in md
    assert "2.10x" in md and "0.40x" in md and "3100" in md and "2.100" in md
    assert "opsd_triton time / Liger = 0.410 (PASS)" in md
    assert "skipped: liger_chunked" in md


def test_report_target_rows_are_read() -> None:
    md = ("| case | target | measured | verdict |\n|---|---|---|---|\n"
          "| jsd N=1024 | time / Liger FLJSD <= 0.5 | 0.612 | FAIL |\n"
          "| jsd N=16384 | peak < 1 GiB | – | not measured |\n")
    assert gpu_check._target_lines(md) == [
        "jsd N=1024: time / Liger FLJSD <= 0.5 = 0.612 (FAIL)",
        "jsd N=16384: peak < 1 GiB = – (not measured)"]


def test_wheels_are_fetched_for_the_gpu_python_at_the_tested_versions(tmp_path: Path,
                                                                     monkeypatch) -> None:
    calls = []

    def fake_run(cmd, *args, **kwargs):
        calls.append(cmd)
        (tmp_path / "liger_kernel-0.8.5-py3-none-any.whl").write_bytes(b"x" * 10)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    assert gpu_check.download_wheels(tmp_path, "3.12") == 0
    (cmd,) = calls
    assert cmd[cmd.index("--python-version") + 1] == "3.12"
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
    from importlib.metadata import version

    assert f"liger-kernel=={version('liger-kernel')}" in cmd
    assert {c.split("==")[0] for c in cmd if "==" in c or c in gpu_check.GPU_WHEELS} == set(
        gpu_check.GPU_WHEELS)
