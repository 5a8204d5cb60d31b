"""`make gpu-check`: build, test and measure the whole GPU path in one run.

    python bench/gpu_check.py [--out DIR] [--wheels DIR] [--steps a,b,...] [--dry-run]

Made for one GPU machine without network, in under 8 minutes on an H100 / H200. Each step has
its own time limit; a step that fails or runs out of time is reported and the others still run:

  peers       installs the wheels of --wheels (default .gpu-wheels/, filled by `make gpu-wheels`
              on a machine with network) into a private folder put on PYTHONPATH, and says which
              peers import; a missing peer is skipped by the benchmarks with a line saying so
  build       the native extension with its CUDA sources, for this GPU's arch only
  tests       every GPU-marked test, then the kernel suites, on the device
  divergence  bench_divergence.py at Liger's shapes (bf16, H = 4096, V = 128256,
              N = 1k .. 16k, frozen and trainable head) and its report (md, json, png)
  prefix      bench_prefix.py at the Qwen3-1.7B shape (bf16, P = S = R = 1024, n = 8)
  cuda_rows   bench_cuda_rows.py: the CUDA row kernel against the Triton one and a plain copy

Results go to --out (default $GPU_CHECK_OUT, else bench/results/gpu-check/): gpu-check.md (the
summary a person reads), gpu-check.json (every figure), gpu-check.log (each step's command and
output) and the divergence report's .md / .json / .png, each headed with the GPU, the torch,
Triton and CUDA versions and the commit.

Without a CUDA device it exits with status 2 and one line saying why. --dry-run goes through
every step on a CPU machine as far as one can: the build for real (incremental), the test
selections collected but not run, the benchmarks at their smoke shapes on the CPU; its results
say "dry run" at the top and are not measurements.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("peers", "build", "tests", "divergence", "prefix", "cuda_rows")
# Seconds per step: together under 8 minutes (the build is one arch; the benchmarks run 5 rounds).
TIME_LIMIT_S = {"peers": 30, "build": 150, "tests": 110, "divergence": 150, "prefix": 60,
                "cuda_rows": 30}
# The time limits are a GPU machine's; a dry run on a small CPU gets this many times more.
DRY_RUN_SLOWDOWN = 8
# Liger's own benchmark sizes (1k .. 8k tokens) and the memory target's 16k.
DIVERGENCE_TOKENS = "1024,2048,4096,8192,16384"
# GPU-only tests run by marker; these suites are the kernels' correctness sweep on the device.
KERNEL_SUITES = ("tests/test_divergence.py", "tests/test_divergence_triton.py",
                 "tests/test_divergence_native.py", "tests/test_divergence_driver.py",
                 "tests/test_divergence_library.py", "tests/test_losses.py",
                 "tests/test_attention.py", "tests/test_attention_triton.py")
# What the peers and the suites import beyond torch and triton: (distribution, module).
PEER_MODULES = (("liger-kernel", "liger_kernel.transformers"), ("trl", "trl.experimental.gkd"),
                ("transformers", "transformers"), ("pytest-benchmark", "pytest_benchmark"),
                ("matplotlib", "matplotlib"), ("datasets", "datasets"),
                ("math-verify", "math_verify"))
# Wheels `make gpu-wheels` fetches: what the peers and the suites need that a CUDA image
# with torch, transformers, accelerate and pytest usually lacks.
GPU_WHEELS = ("liger-kernel", "trl", "datasets", "dill", "multiprocess", "math-verify",
              "latex2sympy2_extended", "antlr4-python3-runtime")
WHEELS_LIMIT_BYTES = 64 * 2**20


@dataclass
class Step:
    name: str
    status: str = "not run"  # ok | failed | timed out | skipped | not run
    seconds: float = 0.0
    detail: str = ""
    data: dict = field(default_factory=dict)


@dataclass
class Context:
    out: Path
    work: Path
    dry_run: bool
    env: dict[str, str]
    log: list[str] = field(default_factory=list)

    def limit(self, seconds: float) -> float:
        return seconds * (DRY_RUN_SLOWDOWN if self.dry_run else 1)

    def run(self, step: Step, cmd: list[str], *, timeout: float, env: dict | None = None
            ) -> subprocess.CompletedProcess | None:
        """Run one command of a step; its output goes to the log. None when it timed out."""
        self.log.append(f"\n$ {' '.join(cmd)}")
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env={**self.env, **(env or {})}, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as err:
            out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (
                err.stdout or "")
            self.log.append(out + f"\n[timed out after {timeout:.0f} s]")
            step.status = "timed out"
            return None
        self.log.append(proc.stdout)
        return proc


# --- the steps ----------------------------------------------------------------------------------


def step_peers(ctx: Context, step: Step, wheels: Path) -> None:
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if found:
        site = ctx.work / "site"
        proc = ctx.run(step, [sys.executable, "-m", "pip", "install", "-q", "--no-index",
                              "--no-deps", "--no-compile", "--target", str(site),
                              *map(str, found)], timeout=ctx.limit(TIME_LIMIT_S["peers"]))
        if proc is None or proc.returncode != 0:
            step.status = step.status if proc is None else "failed"
            step.detail = f"installing the {len(found)} wheels of {wheels} failed (see the log)"
            return
        ctx.env["PYTHONPATH"] = os.pathsep.join([str(site), ctx.env["PYTHONPATH"]])
    step.data["wheels"] = [w.name for w in found]
    missing = _missing_modules(ctx, dict(PEER_MODULES))
    step.data["missing"] = missing
    step.status = "ok"
    where = f"{len(found)} wheels from {wheels}" if found else f"no wheels in {wheels}"
    step.detail = where + ("; missing: " + "; ".join(
        f"{d} ({why}; run `make gpu-wheels` on a machine with network)"
        for d, why in missing.items()) if missing else "; every peer imports")


def step_build(ctx: Context, step: Step) -> None:
    env = {"MAX_JOBS": str(os.cpu_count() or 4)}
    arch = ctx.env.get("OPSD_GPU_ARCH")
    if arch:
        env["OPSD_CMAKE_ARGS"] = f"{ctx.env.get('OPSD_CMAKE_ARGS', '')} " \
                                 f"-DCMAKE_CUDA_ARCHITECTURES={arch}".strip()
    proc = ctx.run(step, [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                   timeout=ctx.limit(TIME_LIMIT_S["build"]), env=env)
    if proc is None:
        return
    device = "cpu" if ctx.dry_run else "cuda"
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, torch; from opsd_kernels._native import device_error;"
         f" print(device_error(torch.device('{device}')) or 'usable')"],
        cwd=ROOT, env=ctx.env, capture_output=True, text=True, timeout=120)
    verdict = (probe.stdout.strip().splitlines() or [probe.stderr.strip()[-300:]])[-1]
    step.data["native"] = verdict
    ok = proc.returncode == 0 and verdict == "usable"
    step.status = "ok" if ok else "failed"
    step.detail = f"native {device} kernels: {verdict}" + (f" (sm_{arch})" if arch else "")


def _junit_counts(path: Path) -> dict[str, int]:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if not path.exists():
        return counts
    root = ET.parse(path).getroot()
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    return counts


def step_tests(ctx: Context, step: Step) -> None:
    deadline = time.monotonic() + ctx.limit(TIME_LIMIT_S["tests"])
    parallel = ["-n", "4"] if _imports(ctx, "xdist") and not ctx.dry_run else []
    runs = {"gpu-marked": ["-m", "gpu", "tests"],
            "kernel suites": ["-m", "not gpu and not slow", *parallel, *KERNEL_SUITES]}
    failed = False
    for label, selection in runs.items():
        junit = ctx.work / f"{label.replace(' ', '-')}.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *selection]
        if ctx.dry_run:
            cmd.append("--collect-only")
        proc = ctx.run(step, cmd, timeout=max(5.0, deadline - time.monotonic()))
        if proc is None:
            step.detail += f"{label}: timed out; "
            return
        if ctx.dry_run:
            collected = re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", proc.stdout)
            n = int(collected.group(1)) if collected else 0
            step.data[label] = {"collected": n}
            failed |= proc.returncode != 0 or n == 0
            step.detail += f"{label}: {n} collected; "
            continue
        counts = _junit_counts(junit)
        broken = counts["failures"] + counts["errors"]
        counts["passed"] = counts["tests"] - broken - counts["skipped"]
        step.data[label] = counts
        # Exit 5 is "no tests collected": a selection that finds nothing is a failure here too.
        failed |= proc.returncode != 0
        step.detail += (f"{label}: {counts['passed']} passed, {broken} failed, "
                        f"{counts['skipped']} skipped; ")
    step.status = "failed" if failed else "ok"
    step.detail = step.detail.rstrip("; ")


def _bench(ctx: Context, step: Step, suite: str, env: dict[str, str], *, show: bool = False
           ) -> tuple[subprocess.CompletedProcess | None, dict | None]:
    raw = ctx.work / f"{step.name}.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           f"bench/{suite}.py", f"--benchmark-json={raw}", *(["-s"] if show else [])]
    proc = ctx.run(step, cmd, timeout=ctx.limit(TIME_LIMIT_S[step.name]), env=env)
    skips = re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", proc.stdout if proc else "", re.M)
    step.data["skipped"] = sorted(set(skips))
    if proc is None:
        return None, None
    if proc.returncode != 0:
        step.status = "failed"
        step.detail = _last_line(proc.stdout)
    data = json.loads(raw.read_text()) if raw.exists() else None
    return proc, data


def _bench_env(ctx: Context, **knobs: str) -> dict[str, str]:
    if ctx.dry_run:
        return {"OPSD_BENCH_SMOKE": "1", "OPSD_BENCH_DEVICE": "cpu"}
    return {"OPSD_BENCH_DEVICE": "cuda", **knobs}


def step_divergence(ctx: Context, step: Step) -> None:
    env = _bench_env(ctx, OPSD_BENCH_TOKENS=DIVERGENCE_TOKENS, OPSD_BENCH_ROUNDS="5",
                     OPSD_BENCH_HEADS="frozen,trainable")
    proc, data = _bench(ctx, step, "bench_divergence", env)
    if data is None:
        step.detail = step.detail or "no benchmark results"
        step.status = step.status if step.status != "not run" else "failed"
        return
    report = ctx.run(step, [sys.executable, "bench/report.py", str(ctx.work / "divergence.json"),
                            "--out-dir", str(ctx.out)], timeout=ctx.limit(60))
    if report is None or report.returncode != 0:
        step.status, step.detail = "failed", "bench/report.py failed (see the log)"
        return
    stem = re.search(r"wrote (\S+)\.\{json,md,png\}", report.stdout)
    written = [Path(f"{stem.group(1)}.{ext}") for ext in ("md", "json", "png")] if stem else []
    step.data["report"] = [p.name for p in written if p.exists()]
    md = written[0] if written and written[0].exists() else None
    targets = _target_lines(md.read_text()) if md else []
    step.data["targets"] = targets
    if step.status == "not run":
        step.status = "ok"
        step.detail = f"{len(data['benchmarks'])} timings; " + (
            "; ".join(targets) if targets else "no target lines in the report")


def _target_lines(markdown: str) -> list[str]:
    """The report's target rows ("| case | target | measured | verdict |"), one line each."""
    out = []
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[3] in ("PASS", "FAIL", "not measured"):
            out.append(f"{cells[0]}: {cells[1]} = {cells[2]} ({cells[3]})")
    return out


def step_prefix(ctx: Context, step: Step) -> None:
    proc, data = _bench(ctx, step, "bench_prefix", _bench_env(ctx), show=True)
    rows = []
    for b in (data or {}).get("benchmarks", []):
        info = b.get("extra_info", {})
        if info.get("impl") == "shared" and "speedup" in info:
            rows.append({k: info.get(k) for k in ("case", "role", "speedup", "peak_vs_plain",
                                                  "hidden_rel_err_vs_plain", "tokens")})
    step.data["rows"] = rows
    if proc is not None and step.status == "not run":
        step.status = "ok" if rows else "failed"
        step.detail = "; ".join(f"{r['role']} {r['speedup']:.2f}x" for r in rows) or \
            "no shared-vs-plain pairs measured"


def step_cuda_rows(ctx: Context, step: Step) -> None:
    proc, data = _bench(ctx, step, "bench_cuda_rows", _bench_env(ctx), show=True)
    rows, targets = [], {}
    for b in (data or {}).get("benchmarks", []):
        info = b.get("extra_info", {})
        if "targets" in info:
            targets = {"values": info["targets"], "failed": info.get("failed", [])}
        elif "achieved_gbps" in info:
            rows.append({k: info[k] for k in ("peer", "case", "dtype", "achieved_gbps")}
                        | {"median_s": b["stats"]["median"]})
    step.data.update(rows=rows, targets=targets)
    if proc is not None and step.status == "not run":
        step.status = "ok" if rows else "skipped"
        step.detail = (f"{len(rows)} timings; targets failed: {targets.get('failed') or 'none'}"
                       if rows else "; ".join(step.data["skipped"]) or "nothing ran")


_PROBE = """
import importlib, json, sys
missing = {}
for name, module in json.loads(sys.argv[1]).items():
    try:
        importlib.import_module(module)
    except Exception as err:
        missing[name] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
print(json.dumps(missing))
"""


def _missing_modules(ctx: Context, modules: dict[str, str]) -> dict[str, str]:
    """{name: why} of the modules that do not import in the steps' environment (one process)."""
    probe = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(modules)], cwd=ROOT,
                           env=ctx.env, capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return {name: f"the import probe failed: {_last_line(probe.stderr)}" for name in modules}
    return json.loads(probe.stdout.strip().splitlines()[-1])


def _imports(ctx: Context, module: str) -> bool:
    return not _missing_modules(ctx, {module: module})


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# --- the machine and the results ----------------------------------------------------------------


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check, in one line; None when it can."""
    try:
        import torch
    except ImportError as err:
        return f"torch does not import ({err}); run with the Python that has the GPU's torch"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build: no CUDA device can be used"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    return None


def machine(dry_run: bool) -> dict[str, str | None]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version(), "host": platform.node(),
            "commit": _git("rev-parse", "HEAD"),
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if dry_run:
        info["gpu"] = f"none (dry run on {platform.processor() or platform.machine()})"
    else:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}",
                    gpu_memory_gib=f"{props.total_memory / 2**30:.0f}",
                    driver=_nvidia_smi("driver_version"))
    return info


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _nvidia_smi(query: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None


def write_results(out: Path, info: dict, steps: list[Step], log: list[str],
                  dry_run: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(
        {"dry_run": dry_run, "machine": info, "steps": [asdict(s) for s in steps]}, indent=2))
    (out / "gpu-check.log").write_text("\n".join(log))
    (out / "gpu-check.md").write_text(summary_markdown(info, steps, dry_run))


def summary_markdown(info: dict, steps: list[Step], dry_run: bool) -> str:
    lines = ["# GPU check" + (" (dry run on CPU: smoke shapes, not measurements)" if dry_run
                             else ""), ""]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", "| step | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.detail} |" for s in steps]
    by_name = {s.name: s for s in steps}
    div = by_name.get("divergence")
    if div is not None and div.data.get("report"):
        lines += ["", "## Fused divergence loss", "",
                  "Time and peak memory of forward + backward against the peers of the same run: "
                  f"{', '.join(div.data['report'])} in this folder."]
        lines += [f"- {t}" for t in div.data.get("targets", [])]
        lines += [f"- skipped: {s}" for s in div.data.get("skipped", [])]
    prefix = by_name.get("prefix")
    if prefix is not None and prefix.data.get("rows"):
        lines += ["", "## Shared prefixes (speed-up and peak over the plain batch, same run)", "",
                  "| case | role | speed-up | peak vs plain | hidden rel. err |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['role']} | {r['speedup']:.2f}x | "
                  f"{_fmt(r['peak_vs_plain'], '.2f', 'x')} | "
                  f"{_fmt(r['hidden_rel_err_vs_plain'], '.1e')} |" for r in prefix.data["rows"]]
    rows = by_name.get("cuda_rows")
    if rows is not None and rows.data.get("rows"):
        lines += ["", "## CUDA row kernel (achieved bandwidth; copy = the yardstick)", "",
                  "| peer | case | dtype | median ms | GB/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['peer']} | {r['case']} | {r['dtype']} | {r['median_s'] * 1e3:.3f} | "
                  f"{r['achieved_gbps']:.0f} |" for r in rows.data["rows"]]
        targets = rows.data.get("targets") or {}
        if targets:
            lines += ["", f"Targets (>= 70% of copy bandwidth, <= 1.2x Triton): "
                          f"{targets.get('values')}; failed: {targets.get('failed') or 'none'}"]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


# --- wheels for the GPU machine -----------------------------------------------------------------


def download_wheels(dest: Path, python_version: str) -> int:
    """Fetch GPU_WHEELS for the GPU machine's Python (x86-64 Linux), at the versions installed
    here when they are (so the check runs the peers this project is tested with)."""
    from importlib.metadata import PackageNotFoundError, version

    dest.mkdir(parents=True, exist_ok=True)
    specs = []
    for name in GPU_WHEELS:
        try:
            specs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            specs.append(name)
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                             "manylinux2014_x86_64") for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", *platforms,
           "-d", str(dest), *specs]
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        print("gpu-wheels: pip download failed (see above)", file=sys.stderr)
        return 1
    total = sum(p.stat().st_size for p in dest.glob("*.whl"))
    print(f"gpu-wheels: {len(list(dest.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {dest}")
    if total > WHEELS_LIMIT_BYTES:
        print(f"gpu-wheels: over {WHEELS_LIMIT_BYTES // 2**20} MiB; remove old versions",
              file=sys.stderr)
        return 1
    return 0


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu-check", description="Build, test and measure the GPU path in one run.")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default $GPU_CHECK_OUT, else "
                             "bench/results/gpu-check)")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels",
                        help="folder of wheels to install first (default .gpu-wheels)")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated subset of {', '.join(STEPS)}")
    parser.add_argument("--dry-run", action="store_true",
                        help="go through every step on a CPU machine (smoke shapes, tests "
                             "collected only)")
    parser.add_argument("--download-wheels", type=Path, default=None, metavar="DIR",
                        help="instead of checking: fetch the wheels the GPU machine needs "
                             "into DIR (needs network)")
    parser.add_argument("--python-version", default="3.12",
                        help="the GPU machine's Python, for --download-wheels (default 3.12)")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        parser.error(f"--steps: unknown {unknown or 'empty'}; choose from {', '.join(STEPS)}")
    args.steps = steps
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.download_wheels is not None:
        return download_wheels(args.download_wheels, args.python_version)
    if not args.dry_run:
        reason = no_gpu_reason()
        if reason is not None:
            print(f"gpu-check: {reason} (--dry-run goes through the steps on a CPU)",
                  file=sys.stderr)
            return 2
    out = (args.out or Path(os.environ.get("GPU_CHECK_OUT") or ROOT / "bench/results/gpu-check")
           ).resolve()
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p))
    if not args.dry_run:
        import torch

        major, minor = torch.cuda.get_device_capability(0)
        env.setdefault("OPSD_GPU_ARCH", f"{major}{minor}")
        env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        ctx = Context(out, Path(work), args.dry_run, env)
        runners: dict[str, Callable[[Context, Step], None]] = {
            "peers": lambda c, s: step_peers(c, s, args.wheels), "build": step_build,
            "tests": step_tests, "divergence": step_divergence, "prefix": step_prefix,
            "cuda_rows": step_cuda_rows}
        steps = []
        for name in args.steps:
            step = Step(name)
            print(f"gpu-check: {name} ...", flush=True)
            start = time.monotonic()
            runners[name](ctx, step)
            step.seconds = time.monotonic() - start
            print(f"gpu-check: {name}: {step.status} ({step.seconds:.0f} s) {step.detail}",
                  flush=True)
            steps.append(step)
        write_results(out, machine(args.dry_run), steps, ctx.log, args.dry_run)
    print(f"gpu-check: results in {out}")
    return 0 if all(s.status in ("ok", "skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
