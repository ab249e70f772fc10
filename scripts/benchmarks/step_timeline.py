"""Where a training loop that does not sync every step loses time: the host or the GPU.

``StepTimeline.mark(name)`` at each phase boundary of a step (``"step"`` first) records the host
clock, the main thread's CPU time and a CUDA event. After the run (one sync) every mark gets
``behind_ms``: how far the GPU was behind the host there, i.e. the time between the host queuing
the event and the GPU reaching it (GPU clock minus host clock, both from the first mark, less
the smallest such lag of the run, where the GPU was waiting for the host). Near 0 means the
GPU had drained its queue and waited for the host ("starved"): the host set the pace there. A
loop bound by its kernels keeps the GPU a full launch queue behind (tens of milliseconds).
``summary()`` gives per phase the host, CPU and GPU milliseconds and how often the GPU starved at
its end, and per step the totals, so that slow windows can be told apart:

* GPU starved, thread CPU time = wall time: the host had more work (or ran slower) than the GPU;
* GPU starved, thread CPU time < wall time: the main thread was not running (other threads,
  other processes, the GIL);
* GPU not starved and its time per step up: the GPU itself was slower (clocks, power, kernels).

Used by ``scripts/benchmarks/bench_train.py --timeline``. On CPU only the host columns exist.
"""

from __future__ import annotations

import statistics
import time

STARVED_MS = 1.0  # GPU at most this far behind the host: it was waiting for work


class StepTimeline:
    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu
        self.marks: list[tuple[str, float, float, object]] = []

    def mark(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        event = None
        if self.on_gpu:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.marks.append((name, now, cpu, event))

    def _behind_ms(self) -> list[float | None]:
        if not self.on_gpu or not self.marks:
            return [None] * len(self.marks)
        t0, e0 = self.marks[0][1], self.marks[0][3]
        lag = [e0.elapsed_time(e) - 1e3 * (t - t0) for _, t, _, e in self.marks]
        floor = min(lag)
        return [x - floor for x in lag]

    def wrap(self, fn, name_before: str | None, name_after: str):
        """``fn`` with a mark before (when ``name_before``) and after each call."""
        def wrapped(*args, **kwargs):
            if name_before:
                self.mark(name_before)
            out = fn(*args, **kwargs)
            self.mark(name_after)
            return out
        return wrapped

    def steps(self, skip: int = 0) -> list[list[dict]]:
        """Per step (from its "step" mark to the next one), its phases: name (the mark that ends
        it), host_ms, cpu_ms, gpu_ms, behind_ms (at its end), starved. The device must be
        synchronized. The last step, which has no next "step" mark, is dropped; so are the first
        ``skip`` steps."""
        behind = self._behind_ms()
        starts = [i for i, m in enumerate(self.marks) if m[0] == "step"]
        out = []
        for a, b in zip(starts, starts[1:]):
            phases = []
            for i in range(a, b):
                (_, t0, c0, e0), (name, t1, c1, e1) = self.marks[i], self.marks[i + 1]
                phases.append({"phase": "loop" if name == "step" else name, "host_ms": 1e3 * (t1 - t0),
                               "cpu_ms": 1e3 * (c1 - c0), "gpu_ms": e0.elapsed_time(e1) if self.on_gpu else None,
                               "behind_ms": behind[i + 1],
                               "starved": None if behind[i + 1] is None else behind[i + 1] < STARVED_MS})
            out.append(phases)
        return out[skip:]

    def summary(self, skip: int = 0) -> dict:
        """Per phase: median host/cpu/gpu ms and the fraction of steps whose GPU starved at its end;
        per step: host, cpu and gpu ms and the number of starved phase ends (compact lists)."""
        steps = self.steps(skip)
        if not steps:
            return {}
        per_phase = {}
        for name in [p["phase"] for p in steps[0]]:
            rows = [p for s in steps for p in s if p["phase"] == name]
            entry = {k: round(statistics.median(p[k] for p in rows), 3) for k in ("host_ms", "cpu_ms")}
            if self.on_gpu:
                entry["gpu_ms"] = round(statistics.median(p["gpu_ms"] for p in rows), 3)
                entry["behind_ms"] = round(statistics.median(p["behind_ms"] for p in rows), 3)
                entry["starved_frac"] = round(sum(bool(p["starved"]) for p in rows) / len(rows), 3)
            per_phase[name] = entry

        def total(s, key):
            return None if s[0][key] is None else round(sum(p[key] for p in s), 2)

        return {
            "phases": per_phase,
            "step_host_ms": [total(s, "host_ms") for s in steps],
            "step_cpu_ms": [total(s, "cpu_ms") for s in steps],
            "step_gpu_ms": [total(s, "gpu_ms") for s in steps],
            "step_starved": [sum(bool(p["starved"]) for p in s) for s in steps] if self.on_gpu else None,
            "step_min_behind_ms": [round(min(p["behind_ms"] for p in s), 2) for s in steps] if self.on_gpu else None,
        }
