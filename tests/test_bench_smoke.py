"""``snakepit bench`` runs end to end and prints a complete JSON document.

A smoke test only: speed is measured by the benchmark and never asserted here.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from rich.console import Console

from snakepit_core.bench import PEER_RATIOS, render, run_bench


def numbers(node: Any) -> Iterator[float]:
    """Every number in a nested JSON value."""
    if isinstance(node, dict):
        for value in node.values():
            yield from numbers(value)
    elif isinstance(node, int | float) and not isinstance(node, bool):
        yield node


@pytest.mark.timeout(60)
def test_quick_bench_prints_every_figure_and_its_ratio_to_the_peers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    returned = run_bench(requests=200, rounds=1, quick=True, as_json=True)
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(json.dumps(returned))
    assert doc.keys() == {
        "settings",
        "environment",
        "results",
        "ratios",
        "peer_ratios",
        "samples",
    }
    assert doc["environment"]["json_codec"] in ("orjson", "json")
    assert doc["environment"]["event_loop"]
    results = doc["results"]
    adapters = doc["settings"]["adapters"]
    assert "python" in adapters
    for adapter in adapters:
        assert set(results["throughput"][adapter]) == {"1", "4"}
        assert set(results["latency"][adapter]) == {"p50_ms", "p99_ms"}
        assert set(results["startup"][adapter]) == {"concurrent_s", "sequential_s"}
    for peer in ("ppe", "pipe"):
        assert set(results["peers"][peer]) == {"startup_s", "throughput", "p50_ms", "p99_ms"}
    assert "raw_spawn_s" in results["startup"]
    assert set(results["sessions"]) == {"store_ops_per_s", "execute_rps", "execute_in_session_rps"}
    assert set(results["validation"]) == {"compute_us", "ping_us"}
    assert {"throughput_vs_ppe", "throughput_vs_pipe", "p99_vs_ppe", "startup_vs_raw"} <= set(
        doc["ratios"]
    )
    assert set(doc["peer_ratios"]) == set(adapters)
    for adapter in adapters:
        assert set(doc["peer_ratios"][adapter]) == set(PEER_RATIOS)
    figures = [*numbers(results), *numbers(doc["ratios"]), *numbers(doc["peer_ratios"])]
    assert figures and all(math.isfinite(x) and x > 0 for x in figures)

    # The report a user reads: figures and ratios against the peers, no goals of our own.
    out = io.StringIO()
    render(doc, Console(file=out, width=100))
    report = out.getvalue()
    assert "median of 1 round," in report
    assert "ProcessPoolExecutor" in report and "pipe" in report
    assert "/ PPE" in report and "/ pipe" in report
    assert f"{doc['peer_ratios']['python']['throughput_vs_ppe']:.2f}x" in report
    assert "target" not in report.lower() and "goal" not in report.lower()
