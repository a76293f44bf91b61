"""Summaries of Mosaic GPU's in-kernel profile (`CompilerParams(profile_dir=...)`): where a kernel's cycles go.

The profiler writes one Perfetto/Chrome trace per launch: for every CTA warpgroup ("trace", the event's tid)
begin/end events of the kernel's `jax.named_scope` regions, timestamps in SM clock cycles / 1000. `summarize`
turns that into cycles per occurrence of each region, how often it ran, and the mean span of a trace: the
numbers docs/kernels/paged_attention.md quotes per 64-key block.
"""
from __future__ import annotations

import collections
import glob
import json
import os


def summarize(trace: dict | str) -> dict:
    """trace: the profiler's JSON (a dict, a file, or a folder whose newest *.json is taken) ->
    {"cycles": {region: mean cycles per occurrence}, "counts": {region: occurrences}, "span_cycles": mean first-begin
    to last-end cycles per trace, "traces": number of traces}. Nested regions count in full inside their parent."""
    if isinstance(trace, str):
        path = trace
        if os.path.isdir(path):
            files = glob.glob(os.path.join(path, "*.json"))
            if not files:
                raise FileNotFoundError(f"no profiler trace (*.json) in {path}")
            path = max(files, key=os.path.getmtime)
        with open(path) as f:
            trace = json.load(f)
    total, counts = collections.Counter(), collections.Counter()
    stacks, first, last = collections.defaultdict(list), {}, {}
    for ev in trace["traceEvents"]:
        tid, ts = ev["tid"], ev["ts"] * 1e3  # back to cycles
        first.setdefault(tid, ts)
        last[tid] = ts
        if ev["ph"] == "B":
            stacks[tid].append((ev["name"], ts))
        elif ev["ph"] == "E":
            name, t0 = stacks[tid].pop()
            if name != ev["name"]:
                raise ValueError(f"unbalanced trace: {ev['name']!r} ends inside {name!r} (tid {tid})")
            total[name] += ts - t0
            counts[name] += 1
    spans = [last[t] - first[t] for t in first]
    return dict(cycles={k: round(total[k] / counts[k], 1) for k in total}, counts=dict(counts),
                span_cycles=round(sum(spans) / max(len(spans), 1), 1), traces=len(spans))
