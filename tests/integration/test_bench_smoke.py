"""A short run of scripts/bench.py: every figure comes out as a number."""

import json
import math
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER_FIGURES = (
    "throughput.server",
    "latency.p50",
    "latency.p99",
    "output.server",
    "output.byte_exact",
    "output.peak_rss_growth",
    "submit.rate",
    "scale.idle_cpu_base",
    "scale.idle_cpu",
    "scale.rss_per_worker",
    "scale.jobs_api_p95",
    "scale.jobs_html_p95",
)
BASELINE_FIGURES = (
    "throughput.parallel",
    "throughput.raw_asyncssh",
    "throughput.raw_run_script",
    "output.ssh",
    "latency.raw_asyncssh_p50",
    "latency.raw_run_script_p50",
)


def bench_user_available() -> bool:
    """Return whether the benchmark account exists or can be created."""
    try:
        pwd.getpwnam("jbbench")
    except KeyError:
        return os.geteuid() == 0
    return True


@pytest.mark.skipif(
    not bench_user_available(), reason="needs root to create the jbbench account"
)
def test_quick_bench_produces_figures(tmp_path: Path) -> None:
    output = tmp_path / "figures.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick"]
    command += ["--repeat", "1", "--backend", "sqlite", "--json", str(output)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=240, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = {
        (f["key"], f["backend"]): f["value"] for f in json.loads(output.read_text())
    }
    for key in SERVER_FIGURES:
        assert (key, "sqlite") in figures, f"{key} missing for sqlite"
    for key in BASELINE_FIGURES:
        assert (key, "-") in figures, f"{key} missing"
    for key, value in figures.items():
        assert math.isfinite(value), f"{key} is {value}"
        assert value >= 0, f"{key} is negative: {value}"
    assert figures[("output.byte_exact", "sqlite")] == 1.0
    assert "Targets (from the medians above)" in result.stdout
