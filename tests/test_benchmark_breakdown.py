"""examples/benchmark_iteration_breakdown.py: the report's ratios (the measurement itself needs a planned dataset
and minutes; examples/ITERATION_COST.md holds a measured run)."""

from __future__ import annotations

import argparse

from conftest import load_example


def test_report_ratios_to_the_stock_step() -> None:
    bench = load_example("benchmark_iteration_breakdown.py", "tak_iteration_breakdown")
    times = {name: [0.1, 0.2, 0.3] for name in bench.PIECES}
    times["stock step"] = [1.0, 1.0, 5.0]
    times["TAK step"] = [2.5, 2.5, 0.1]
    times["student fwd+bwd"] = [1.5, 1.5, 1.5]
    times["stock fwd+bwd x2"] = [1.2, 1.2, 1.2]
    args = argparse.Namespace(features=[16, 128], patch=[48, 64, 64], batch=2, device="cpu", repeats=3)
    text = bench.report(times, args)
    assert "| TAK step | 2500 | 2.500 |" in text
    assert "| stock step | 1000 | 1.000 |" in text
    assert "floor (stock x2 + teacher fwd) / stock: 0.400" in text
    assert "text-prior head's share (student fwd+bwd - stock fwd+bwd x2) / stock: 0.300" in text
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == len(bench.PIECES) + 1
