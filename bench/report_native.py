"""Turn a pytest-benchmark JSON from bench_native.py into a report of ratios and targets.

    python bench/report_native.py .benchmarks/native.json [--out-dir bench/results]

Writes <device-slug>-<date>-native.json (device, versions, commit, every measurement),
.md (the targets, then per case each peer's time and its ratios) and .png (time per peer).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from report import fmt_mib, fmt_ratio, git_commit, load_warning, ratio, slug  # noqa: E402

Row = dict[str, Any]
# (group, peer, reference peer, key, bound, "max" | "min"): the targets of the native backend.
TARGETS = [
    ("rows", "torch", "native", "median_s", 3.0, "min"),  # torch time / native time >= 3
    ("e2e", "opsd_native", "opsd_torch", "median_s", 0.75, "max"),
    ("e2e", "opsd_native", "bare_gemms", "median_s", 1.25, "max"),
    ("e2e", "opsd_native", "opsd_torch", "peak_bytes", 1.0, "max"),
]
KEEP = ("group peer case median_s min_s rounds peak_bytes loss loss_rel_err grad_rel_err"
        " load_avg_1min threads").split()


def load(raw: dict[str, Any]) -> list[Row]:
    rows = []
    for b in raw["benchmarks"]:
        info = b.get("extra_info", {})
        if "group" in info and "peer" in info:
            rows.append({**info, "median_s": b["stats"]["median"], "min_s": b["stats"]["min"],
                         "rounds": b["stats"]["rounds"]})
    if not rows:
        raise SystemExit("no bench_native benchmarks in this JSON")
    return rows


def by_case(rows: list[Row]) -> dict[tuple[str, str], dict[str, Row]]:
    out: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        out.setdefault((r["group"], r["case"]), {})[r["peer"]] = r
    return out


def target_lines(cases: dict[tuple[str, str], dict[str, Row]]) -> list[str]:
    out = ["| case | target | measured | verdict |", "|---|---|---|---|"]
    for (group, case), peers in cases.items():
        for t_group, peer, ref, key, bound, sense in TARGETS:
            if t_group != group or peer not in peers or ref not in peers:
                continue
            value = ratio(peers[peer].get(key), peers[ref].get(key))
            what = "time" if key == "median_s" else "peak memory"
            text = f"{peer} {what} ÷ {ref} {'≥' if sense == 'min' else '≤'} {bound}"
            ok = value is not None and (value >= bound if sense == "min" else value <= bound)
            verdict = "not measured" if value is None else "PASS" if ok else "FAIL"
            out.append(f"| {case} | {text} | {'–' if value is None else f'{value:.3f}'} | "
                       f"{verdict} |")
    return out if len(out) > 2 else ["No target applies to the peers measured in this run."]


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.1f}" if ms >= 10 else f"{ms:.3g}"


def case_table(peers: dict[str, Row]) -> list[str]:
    refs = [p for p in ("torch", "opsd_torch", "bare_gemms") if p in peers]
    head = ["peer", "median ms", "min ms", "MiB"] + [f"÷ {p}" for p in refs] + ["loss err",
                                                                                  "grad err"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in peers.items():
        cells = [name, _ms(r["median_s"]), _ms(r["min_s"]), fmt_mib(r.get("peak_bytes"))]
        cells += [fmt_ratio(ratio(r["median_s"], peers[p]["median_s"])) for p in refs]
        cells += [f"{r[k]:.1e}" if r.get(k) is not None else "–"
                  for k in ("loss_rel_err", "grad_rel_err")]
        out.append("| " + " | ".join(cells) + " |")
    return out


def plot(cases: dict[tuple[str, str], dict[str, Row]], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(8.0, 1.6 * len(cases) + 3), 5))
    names = list(dict.fromkeys(p for peers in cases.values() for p in peers))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j, peers in enumerate(cases.values())
              if name in peers]
        ys = [peers[name]["median_s"] * 1e3 for peers in cases.values() if name in peers]
        bars = ax.bar(xs, ys, width, label=name, color=plt.cm.tab10(i))
        ax.bar_label(bars, [f"{y:,.0f}" for y in ys], fontsize=7, rotation=90, padding=2)
    ax.set_yscale("log")
    ax.set_xticks(range(len(cases)), [f"{g}\n{c}" for g, c in cases], fontsize=7)
    ax.set_ylabel("median time (ms, log scale)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", type=Path)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    raw = json.loads(args.raw.read_text())
    rows = load(raw)
    first = rows[0]
    commit, dirty = git_commit()
    date = raw.get("datetime", "")[:10] or "undated"
    smoke = any(r.get("smoke") for r in rows)
    stem = f"{slug(first['device_name'])}-{date}-native" + ("-smoke" if smoke else "")
    short = "unknown" if commit is None else commit[:10] + ("+dirty" if dirty else "")
    cases = by_case(rows)
    md = [f"# Native CPU backend: {first['device_name']}", "",
          f"- date: {raw.get('datetime')}", f"- commit: {short}",
          f"- torch {first['torch']}; native: {first['native']}; {first['threads']} threads, fp32",
          "- rows: one row step (divergence + gradient, both roles read) on a [rows, V] block;"
          " e2e: fused_linear_divergence forward + backward, generalized JSD beta 0.5, frozen"
          " head; bare_gemms: both roles' logits and the hidden gradient, nothing else",
          f"- time: median of {first['rounds']} rounds (e2e); memory: incremental peak (VmHWM)",
          *load_warning(rows), "", "## Targets", "",
          *(["Smoke run: shapes too small for the targets."] if smoke else target_lines(cases)),
          ""]
    for (group, case), peers in cases.items():
        md += [f"## {group}: {case}", "", *case_table(peers), ""]
    md += [f"![median time per peer]({stem}.png)", ""]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"device": first["device_name"], "torch": first["torch"], "native": first["native"],
            "commit": commit, "dirty": dirty, "date": raw.get("datetime"), "smoke": smoke}
    (args.out_dir / f"{stem}.json").write_text(json.dumps(
        {**meta, "cases": [{k: r.get(k) for k in KEEP} for r in rows]}, indent=1) + "\n")
    (args.out_dir / f"{stem}.md").write_text("\n".join(md))
    plot(cases, f"{first['device_name']} · {short} · {date}", args.out_dir / f"{stem}.png")
    print(f"wrote {args.out_dir / stem}.{{json,md,png}}")
    print("\n".join(md))


if __name__ == "__main__":
    main()
