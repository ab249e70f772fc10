"""Plot scripts/benchmarks/bench_train.py results (JSON lines) as a PNG: tokens/s/GPU against sequence length
(a --seq-sweep run), or tokens/s/GPU and peak memory per GPU against model size (runs of several
model configs in several layouts).

    python scripts/tools/plot_bench.py results/bench_train.jsonl --out docs/seq_sweep.png
    python scripts/tools/plot_bench.py a.jsonl b.jsonl --x params --out docs/size_sweep.png

Against seq: one line per (model, impl, compile, varlen, trainer args). Against params: one line
per layout (GPUs, FSDP/TP degrees) and impl. Failed or skipped rows are left out.
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
            for number, line in enumerate(f, start=1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a killed run
                    if line.strip():
                        print(f"plot_bench: {path} line {number} is not a complete record; skipped", file=sys.stderr)
                    continue
                if "header" in row:
                    device = row["header"].get("device", "")
                elif row.get("tokens_per_s"):
                    rows.append({"device": device, **row})
    return rows


def layout(row: dict) -> str:
    world, tp = row.get("world_size", 1), row.get("tp", 1)
    if tp == 1:
        return "1 GPU" if world == 1 else f"FSDP={world}"
    return f"TP={tp}" if world == tp else f"FSDP={world // tp} x TP={tp}"


def label(row: dict, x: str = "seq") -> str:
    tags = [row["impl"], "compiled" if row["compile"] else "eager"]
    if row.get("varlen"):
        tags.append("varlen")
    if row.get("trainer_args"):
        tags.append(row["trainer_args"])
    # Against params, lines join model sizes: name the layout, not the model.
    return f"{layout(row) if x == 'params' else row['model']} ({', '.join(tags)})"


def series(rows: list[dict], x: str, y: str = "tokens_per_s") -> dict[str, list[tuple[float, float]]]:
    lines = defaultdict(list)
    for row in rows:
        if row.get(y) is not None:
            lines[label(row, x)].append((row[x], row[y]))
    return {k: sorted(v) for k, v in lines.items()}


def plot(rows: list[dict], x: str, out: str, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    if x == "params":
        missing = [r["model"] for r in rows if "params" not in r]
        if missing:
            raise SystemExit(f"plot_bench: rows of {sorted(set(missing))} have no 'params' (written by an "
                             "older bench_train.py); re-run them or use --x seq")
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
        panels = [(axes[0], "tokens_per_s", 1e3, "tokens/s per GPU (thousands)"),
                  (axes[1], "peak_gib", 1, "peak memory per GPU (GiB)")]
    else:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
        panels = [(ax, "tokens_per_s", 1e3, "tokens/s per GPU (thousands)")]
    for ax, y, scale, ylabel in panels:
        for name, points in series(rows, x, y).items():
            xs, ys = zip(*points)
            if x == "params":
                xs = [v / 1e6 for v in xs]
            ax.plot(xs, [v / scale for v in ys], marker="o", label=name)
        if x == "seq":
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["seq"] for r in rows}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{int(v) // 1024}k"))
            ax.set_xlabel("sequence length (tokens per batch constant)")
        elif x == "params":
            ax.set_xticks(sorted({round(r["params"] / 1e6) for r in rows}))
            ax.set_xlabel("parameters (millions)")
        else:
            ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    panels[0][0].legend(fontsize=8)
    devices = sorted({r.get("device", "") for r in rows} - {""})
    fig.suptitle(title or f"scripts/benchmarks/bench_train.py{' on ' + ', '.join(devices) if devices else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="bench_train.py JSON-lines files")
    p.add_argument("--x", default="seq", help="row key for the x axis: seq (default), params, or any other")
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
