"""Plot scripts/bench_train.py results (JSON lines) as a PNG: tokens/s/GPU against sequence length
(a --seq-sweep run) and, when rows of several model sizes are present, against parameter count.

    python scripts/plot_bench.py results/bench_train.jsonl --out docs/seq_sweep.png
    python scripts/plot_bench.py a.jsonl b.jsonl --x seq --out docs/seq_sweep.png

One line per (model, impl, compile, varlen, trainer args); failed or skipped rows are left out.
Needs matplotlib (`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def load_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        device = ""
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if "header" in row:
                    device = row["header"].get("device", "")
                elif row.get("tokens_per_s"):
                    rows.append({"device": device, **row})
    return rows


def label(row: dict) -> str:
    tags = [row["impl"], "compiled" if row["compile"] else "eager"]
    if row.get("varlen"):
        tags.append("varlen")
    if row.get("trainer_args"):
        tags.append(row["trainer_args"])
    return f"{row['model']} ({', '.join(tags)})"


def series(rows: list[dict], x: str) -> dict[str, list[tuple[float, float]]]:
    lines = defaultdict(list)
    for row in rows:
        lines[label(row)].append((row[x], row["tokens_per_s"]))
    return {k: sorted(v) for k, v in lines.items()}


def plot(rows: list[dict], x: str, out: str, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, points in series(rows, x).items():
        xs, ys = zip(*points)
        ax.plot(xs, [y / 1e3 for y in ys], marker="o", label=name)
    if x == "seq":
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["seq"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{int(v) // 1024}k"))
        ax.set_xlabel("sequence length (tokens per batch constant)")
    else:
        ax.set_xlabel(x)
    ax.set_ylabel("tokens/s per GPU (thousands)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    devices = sorted({r.get("device", "") for r in rows} - {""})
    ax.set_title(title or f"scripts/bench_train.py{' on ' + ', '.join(devices) if devices else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="bench_train.py JSON-lines files")
    p.add_argument("--x", default="seq", help="row key for the x axis (default: seq)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    rows = load_rows(args.results)
    if not rows:
        print(f"plot_bench: no measured rows in {', '.join(args.results)}", file=sys.stderr)
        return 1
    plot(rows, args.x, args.out, args.title)
    print(f"{len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
