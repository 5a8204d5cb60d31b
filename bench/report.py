"""Turn a pytest-benchmark JSON from bench_divergence.py into committed results.

    python bench/report.py bench/results/raw.json [--out-dir bench/results]

Writes <device-slug>-<date>.json (device, versions, commit, date, every case's median time and
peak memory), .md (every figure as a ratio to the peers of the same run, plus the targets) and
.png (time and peak memory per peer).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: CI and GPU boxes have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

# Peers every figure is divided by, when the run measured them: (peer, column heading).
REFERENCES = [
    ("naive", "naive"),
    ("torch_compile_chunked", "compile"),
    ("liger_fused_linear_jsd", "Liger FLJSD"),
    ("liger_chunked", "Liger chunked"),
    ("bare_gemms", "GEMMs"),
]
GIB = 2**30

Row = dict[str, Any]


def load_cases(raw: dict[str, Any]) -> list[Row]:
    rows = []
    for b in raw["benchmarks"]:
        info = b.get("extra_info", {})
        if "peer" not in info:
            continue  # not one of ours
        rows.append(
            {
                **info,
                "median_s": b["stats"]["median"],
                "min_s": b["stats"]["min"],
                "rounds": b["stats"]["rounds"],
            }
        )
    if not rows:
        raise SystemExit("no bench_divergence benchmarks in this JSON")
    return rows


def git_commit() -> tuple[str | None, bool]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None, True  # e.g. a repository with no commit yet
    return commit, bool(git("status", "--porcelain", "--untracked-files=no"))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def group_by_case(rows: list[Row]) -> dict[str, dict[str, Row]]:
    groups: dict[str, dict[str, Row]] = {}
    for r in sorted(rows, key=lambda r: (r["train_weight"], r["n"])):
        groups.setdefault(r["case"], {})[r["peer"]] = r
    return groups


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def fmt_mib(b: int | None) -> str:
    return "–" if b is None else f"{b / 2**20:,.1f}"


def fmt_err(x: float | None) -> str:
    return "–" if x is None else f"{x:.1e}"


def case_tables(peers: dict[str, Row]) -> list[str]:
    refs = [(p, h) for p, h in REFERENCES if p in peers]
    acc_ref = next((r["reference_peer"] for r in peers.values() if r.get("reference_peer")), None)
    out = [
        "Median time and its ratio to each peer. Accuracy: loss relative error and max-abs"
        f" student-gradient error (relative to its max) against {acc_ref or 'no reference'}.",
        "",
    ]
    head = ["peer", "ms"] + [f"÷ {h}" for _, h in refs] + ["loss err", "grad err"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in peers.items():
        cells = [name, f"{r['median_s'] * 1e3:,.1f}"]
        cells += [fmt_ratio(ratio(r["median_s"], peers[p]["median_s"])) for p, _ in refs]
        cells += [fmt_err(r.get("loss_rel_err")), fmt_err(r.get("grad_rel_err"))]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Incremental peak memory of one forward + backward, and ratio to each peer.", ""]
    head = ["peer", "MiB"] + [f"÷ {h}" for _, h in refs]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in peers.items():
        cells = [name, fmt_mib(r["peak_bytes"])]
        cells += [fmt_ratio(ratio(r["peak_bytes"], peers[p]["peak_bytes"])) for p, _ in refs]
        out.append("| " + " | ".join(cells) + " |")
    return out


Check = Callable[[dict[str, Row]], "tuple[str, float | None, float] | None"]


def _target(peer: str, ref: str, key: str, limit: float) -> Check:
    def check(peers: dict[str, Row]) -> tuple[str, float | None, float] | None:
        if peer not in peers:
            return None
        value = ratio(peers[peer][key], peers.get(ref, {}).get(key))
        what = "time" if key == "median_s" else "peak memory"
        return f"{peer} {what} ÷ {ref} ≤ {limit}", value, limit

    return check


def _peak_below(peer: str, n: int, limit_bytes: int) -> Check:
    def check(peers: dict[str, Row]) -> tuple[str, float | None, float] | None:
        r = peers.get(peer)
        if r is None or r["n"] != n or r["train_weight"]:
            return None
        value = None if r["peak_bytes"] is None else r["peak_bytes"] / GIB
        return (
            f"{peer} peak at N={n} (frozen head) < {limit_bytes / GIB:g} GiB",
            value,
            limit_bytes / GIB,
        )

    return check


TARGETS: dict[str, list[Check]] = {
    "cpu": [
        _target("opsd_torch", "naive", "peak_bytes", 0.25),
        _target("opsd_torch", "naive", "median_s", 1.0),
    ],
    "cuda": [
        _target("opsd_triton", "liger_fused_linear_jsd", "median_s", 0.5),
        _target("opsd_triton", "bare_gemms", "median_s", 1.3),
        _peak_below("opsd_triton", 16384, GIB),
    ],
}


def target_lines(groups: dict[str, dict[str, Row]], device: str) -> list[str]:
    out = ["| case | target | measured | verdict |", "|---|---|---|---|"]
    for case, peers in groups.items():
        for check in TARGETS.get(device, []):
            res = check(peers)
            if res is None:
                continue
            text, value, limit = res
            verdict = "not measured" if value is None else "PASS" if value <= limit else "FAIL"
            shown = "–" if value is None else f"{value:.3f}"
            out.append(f"| {case} | {text} | {shown} | {verdict} |")
    return out if len(out) > 2 else ["No target applies to the peers measured in this run."]


def plot(groups: dict[str, dict[str, Row]], title: str, path: Path) -> None:
    names = list(dict.fromkeys(p for peers in groups.values() for p in peers))
    cases = list(groups)
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 2.2 * len(cases) + 4), 9.5))
    width = 0.8 / len(names)
    plain = FuncFormatter(lambda y, _: f"{y:,g}")  # "2,000" reads better than "2x10^3"
    panels = [
        (axes[0], "median_s", "time (ms, log scale)", 1e3),
        (axes[1], "peak_bytes", "incremental peak memory (MiB, log scale)", 1 / 2**20),
    ]
    for ax, key, ylabel, scale in panels:
        for i, name in enumerate(names):
            xs, ys = [], []
            for j, case in enumerate(cases):
                r = groups[case].get(name)
                if r is not None and r[key] is not None:
                    xs.append(j + (i - (len(names) - 1) / 2) * width)
                    ys.append(max(r[key] * scale, 1e-3))  # log axis: keep bars positive
            bars = ax.bar(xs, ys, width, label=name, color=plt.cm.tab10(i))
            labels = [f"{y:,.0f}" if y >= 10 else f"{y:.2g}" for y in ys]
            ax.bar_label(bars, labels, fontsize=7, rotation=90, padding=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # ticks inside a decade
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(cases)), cases, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    # One legend above both panels, where it cannot hide a bar.
    fig.legend(
        *axes[0].get_legend_handles_labels(),
        loc="upper center",
        ncol=min(4, len(names)),
        fontsize=9,
        bbox_to_anchor=(0.5, 0.965),
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Per-case fields copied into the committed JSON.
KEEP = (
    "peer case n h v dtype train_weight beta temperature median_s min_s rounds peak_bytes"
    " loss reference_peer loss_rel_err grad_rel_err load_avg_1min"
).split()


def load_warning(rows: list[Row]) -> list[str]:
    cores = rows[0].get("cpu_count") or 0
    worst = max((r.get("load_avg_1min") or 0.0) for r in rows)
    if cores and worst > cores:
        return [
            f"- **warning**: 1-minute load average reached {worst:.1f} on {cores} cores during"
            " this run; other work competed for the CPU, so timings are noisy."
        ]
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", type=Path, help="JSON written by pytest --benchmark-json")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    raw = json.loads(args.raw.read_text())
    rows = load_cases(raw)
    first = rows[0]
    commit, dirty = git_commit()
    date = raw.get("datetime", "")[:10] or "undated"
    smoke = any(r.get("smoke") for r in rows)
    stem = f"{slug(first['device_name'])}-{date}" + ("-smoke" if smoke else "")
    meta = {
        "device": first["device_name"],
        "device_type": first["device"],
        "torch": first["torch"],
        "triton": first["triton"],
        "commit": commit,
        "dirty": dirty,
        "date": raw.get("datetime"),
        "smoke": smoke,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cases = [{k: r.get(k) for k in KEEP} for r in rows]
    (args.out_dir / f"{stem}.json").write_text(
        json.dumps({**meta, "cases": cases}, indent=1) + "\n"
    )

    groups = group_by_case(rows)
    short = "unknown" if commit is None else commit[:10] + ("+dirty" if dirty else "")
    md = [
        f"# Fused linear divergence benchmark: {meta['device']}",
        "",
        f"- date: {meta['date']}",
        f"- commit: {short} (+dirty: uncommitted changes to tracked files)",
        f"- torch {meta['torch']}, triton {meta['triton']}",
        f"- loss: generalized JSD, beta={first['beta']}, temperature={first['temperature']};"
        " one forward + backward (student hidden gradient, and lm_head gradient for trainW)",
        f"- time: median of {first['rounds']} rounds; memory: incremental peak of one call"
        + (" (CUDA allocator)" if meta["device_type"] == "cuda" else " (resident set, VmHWM)"),
        *load_warning(rows),
        "",
    ]
    targets = (
        ["Smoke run: the shapes are too small for the targets to mean anything."]
        if smoke
        else target_lines(groups, meta["device_type"])
    )
    md += ["## Targets", "", *targets, ""]
    for case, peers in groups.items():
        md += [f"## {case}", ""] + case_tables(peers) + [""]
    md += [f"![time and peak memory per peer]({stem}.png)", ""]
    (args.out_dir / f"{stem}.md").write_text("\n".join(md))

    plot(groups, f"{meta['device']} · {short} · {date}", args.out_dir / f"{stem}.png")
    print(f"wrote {args.out_dir / stem}.{{json,md,png}}")
    print("\n".join(md))


if __name__ == "__main__":
    main()
