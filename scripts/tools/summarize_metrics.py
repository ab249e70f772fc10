"""Summarize metrics.jsonl files as one markdown table row each.

    python scripts/tools/summarize_metrics.py --skip 10 name=outputs/a/metrics.jsonl other=outputs/b/metrics.jsonl

Throughput, MFU and memory are medians over logged steps after --skip (warm-up, autotune, compile);
losses are the first and last logged; first-step is the step-1 wall time (startup excluded).
"""

import argparse
import json
import statistics
import sys


def read_records(path: str) -> list[dict]:
    """The JSON records of a metrics.jsonl; a line that is not one (cut by a killed run) is skipped
    with a notice on stderr."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"summarize_metrics: {path} line {number} is not a complete record (cut by a kill?); "
                      "skipped", file=sys.stderr)
    return rows


def summarize(path: str, skip: int) -> dict:
    rows = read_records(path)
    steady = [r for r in rows if r["step"] > skip] or rows
    mfu = [r["mfu"] for r in steady if r["mfu"] is not None]
    return {
        "steps": rows[-1]["step"],
        "tps": statistics.median(r["tps"] for r in steady),
        "mfu": statistics.median(mfu) if mfu else None,
        "memory_gib": max(r["memory_gib"] for r in rows),
        "first_step_s": rows[0]["step_time_s"],
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("runs", nargs="+", help="name=path/to/metrics.jsonl")
    args = parser.parse_args()
    print("| run | steps | tokens/s/GPU | MFU % | peak GiB | first step s | loss first → last |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run in args.runs:
        name, _, path = run.partition("=")
        try:
            s = summarize(path, args.skip)
        except (OSError, ValueError, KeyError, IndexError) as e:
            print(f"| {name} | failed: {type(e).__name__} | | | | | |")
            continue
        mfu = f"{s['mfu']:.1f}" if s["mfu"] is not None else "n/a"
        print(f"| {name} | {s['steps']} | {s['tps']:,.0f} | {mfu} | {s['memory_gib']:.1f} | "
              f"{s['first_step_s']:.0f} | {s['loss_first']:.3f} → {s['loss_last']:.3f} |")


if __name__ == "__main__":
    main()
