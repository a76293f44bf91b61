"""The in-kernel profile summary on a synthetic trace in the profiler's format (cycles / 1000 as timestamps)."""
import json

import pytest

from kernels_pallas.kernel_profile import summarize


def events(tid, spans):
    out = []
    for name, begin, end in spans:  # cycles
        out.append(dict(name=name, ph="B", ts=begin / 1e3, pid=1, tid=tid))
        out.append(dict(name=name, ph="E", ts=end / 1e3, pid=1, tid=tid))
    return out


def test_cycles_per_region_counts_and_span(tmp_path):
    # two traces; "pv" nests inside "block" and counts in full inside it
    a = [dict(name="block", ph="B", ts=0.1, pid=1, tid=1), *events(1, [("pv", 150, 250)]),
         dict(name="block", ph="E", ts=0.4, pid=1, tid=1), *events(1, [("softmax", 500, 530)])]
    b = events(2, [("softmax", 1000, 1090), ("pv", 1100, 1400)])
    trace = {"displayTimeUnit": "ns", "traceEvents": a + b}
    (tmp_path / "old.json").write_text(json.dumps({"traceEvents": events(9, [("x", 0, 1)])}))
    (tmp_path / "new.json").write_text(json.dumps(trace))
    import os
    os.utime(tmp_path / "old.json", (1, 1))  # the newest file in a folder is the one read
    for source in (trace, str(tmp_path / "new.json"), str(tmp_path)):
        got = summarize(source)
        assert got["cycles"] == {"block": 300.0, "pv": 200.0, "softmax": 60.0}
        assert got["counts"] == {"block": 1, "pv": 2, "softmax": 2}
        assert got["traces"] == 2 and got["span_cycles"] == pytest.approx((430 + 400) / 2)


def test_unbalanced_trace_raises():
    bad = {"traceEvents": [dict(name="a", ph="B", ts=0.0, tid=1), dict(name="b", ph="B", ts=0.1, tid=1),
                           dict(name="a", ph="E", ts=0.2, tid=1)]}
    with pytest.raises(ValueError, match="unbalanced"):
        summarize(bad)
