"""Plot keys of metrics.jsonl files over steps as a PNG (an RL run's reward, a loss curve).

    python scripts/tools/plot_metrics.py outputs/rl/grpo/metrics.jsonl --keys reward_mean --out reward.png
    python scripts/tools/plot_metrics.py a=outputs/a/metrics.jsonl b=outputs/b/metrics.jsonl --keys loss

One panel per key, one line per file (``name=path`` names it). Lines cut by a kill are skipped
with a notice. Needs matplotlib (`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import argparse

from scripts.tools.summarize_metrics import read_records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="metrics.jsonl paths, optionally name=path")
    ap.add_argument("--keys", default="reward_mean", help="comma-separated metrics to plot")
    ap.add_argument("--title", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = args.keys.split(",")
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 3 * len(keys)), squeeze=False)
    for run in args.runs:
        name, _, path = run.rpartition("=") if "=" in run else (run, "", run)
        rows = [r for r in read_records(path) if "step" in r]
        for ax, key in zip(axes[:, 0], keys):
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker=".", label=name)
    for ax, key in zip(axes[:, 0], keys):
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if len(args.runs) > 1:
            ax.legend()
    if args.title:
        axes[0, 0].set_title(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
