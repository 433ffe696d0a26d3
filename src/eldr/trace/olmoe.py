"""Build a Task-like trace from the real expert routing of OLMoE-1B-7B (`eldr trace build olmoe`).

Source data (`../shared/data`, see its README): allenai/OLMoE's routing analysis (Apache-2.0) records
the real top-8 of OLMoE-1B-7B (64 experts, 16 MoE layers) at layers 0, 7 and 15 for the first 208,896
tokens of four domain texts, as counts per (token id, expert); the texts and the tokenizer come along.

Method, per domain:
1. Tokenize the text with the shipped tokenizer (no special tokens) and keep its first 208,896 tokens,
   the positions that have routing data. Later tokens are never used.
2. Route every kept position once: its top-8 per recorded layer is drawn without replacement from its
   token id's routing distribution in that domain (`sampling.systematic_topk`; each expert's inclusion
   probability is exactly the share of that id's occurrences routed to it, so a token seen once gets its
   recorded top-8). An id absent from the routing file (tokenizer drift) falls back to the domain's
   per-expert shares over all its tokens; the number of such positions is kept in the trace's meta.
   Every request window over a position sees the same draw, as a model routes the same text alike.
3. Split the positions: the first `calibration_fraction` of them serve calibration requests only, the
   rest evaluation requests only, so the two sets never share text.
4. A request is a prompt window and, right after it, an output window that stands for the generated
   tokens, at a uniform random start inside its region; lengths come from Azure 2023 rows clipped to
   [1, max_prompt] and [1, max_output] (and, if still too long, the prompt is cut to fit the region).
   Its counts are prefix-sum differences of the routed positions: conservation holds by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from eldr import __version__
from eldr.errors import ConfigError, InputFileError, InvalidInputError
from eldr.inputfile import read_text
from eldr.limits import MAX_BYTES_ENV, MAX_VOCAB, max_bytes
from eldr.npzfile import ArraySpec, read_npz
from eldr.trace.azure import AZURE_KINDS, AzureTrace, allocate, load_azure, poisson_arrivals, replay_rows
from eldr.trace.format import Trace
from eldr.trace.sampling import systematic_topk

DOMAINS = ("arxiv", "book", "github", "wikipedia")
ROUTED_TOKENS = 208_896  # tokens per domain text with routing data (102 chunks of 2048)
LAYERS = (0, 7, 15)
NUM_MODEL_LAYERS = 16
NUM_EXPERTS = 64
TOP_K = 8
# the routing file's arrays, per recorded layer: [R] token id, expert id and count of each record
ROUTING_ARRAYS = tuple(
    ArraySpec(f"layer{layer}_{name}", 1, "iu", is_required=False)
    for layer in LAYERS
    for name in ("token_id", "expert_id", "count")
)
# the paper's Task workload sizes (legal 3600, code 2779, math 2744, medical 2545) given to our four
# domains: the biggest to books, code to GitHub, math to arXiv, the smallest to Wikipedia
PAPER_MIX = (("book", 3600.0), ("github", 2779.0), ("arxiv", 2744.0), ("wikipedia", 2545.0))
ATTRIBUTION = (
    "Expert routing, texts and tokenizer: allenai/OLMoE (OLMoE-1B-7B routing analysis), Apache-2.0. "
    "Request lengths and arrivals: Azure LLM inference trace 2023 (Azure/AzurePublicDataset), CC-BY-4.0."
)


@dataclass(frozen=True)
class OlmoeConfig:
    num_requests: int
    num_calibration: int = 1000
    rate: float = 60.0
    is_replay: bool = False
    azure: str = "conv"
    max_prompt: int = 1024
    max_output: int = 512
    calibration_fraction: float = 0.2
    mix: tuple[tuple[str, float], ...] = PAPER_MIX
    seed: int = 0
    is_exact_decode: bool = False

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ConfigError(f"number of requests must be >= 1, got {self.num_requests}")
        if not 0 <= self.num_calibration <= self.num_requests:
            raise ConfigError(
                f"calibration requests must lie in [0, {self.num_requests}], got {self.num_calibration}"
            )
        if self.azure not in AZURE_KINDS:
            raise ConfigError(f"azure trace must be one of {AZURE_KINDS}, got {self.azure!r}")
        if self.max_prompt < 1 or self.max_output < 1:
            raise ConfigError("max_prompt and max_output must be >= 1")
        if not 0.0 < self.calibration_fraction < 1.0:
            raise ConfigError(f"calibration fraction must lie in (0, 1), got {self.calibration_fraction}")
        if not self.is_replay and not (self.rate > 0 and np.isfinite(self.rate)):
            raise ConfigError(f"request rate must be a positive number, got {self.rate}")
        names = [name for name, _ in self.mix]
        unknown = sorted(set(names) - set(DOMAINS))
        if unknown or len(set(names)) != len(names) or not names:
            raise ConfigError(f"mix must name distinct domains among {DOMAINS}, got {names}")
        if any(weight < 0 for _, weight in self.mix) or sum(weight for _, weight in self.mix) <= 0:
            raise ConfigError("mix weights must be non-negative with a positive sum")


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    """`book=3600,github=2779` -> (("book", 3600.0), ("github", 2779.0))."""
    pairs: list[tuple[str, float]] = []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not np.isfinite(weight):
            raise ConfigError(f"mix entry {item!r} is not DOMAIN=WEIGHT (e.g. book=3600,github=2779)")
        pairs.append((name.strip(), weight))
    return tuple(pairs)


@dataclass(frozen=True)
class RoutedText:
    """One domain's text, routed once: top-k ids per position and their prefix sums."""

    topk: npt.NDArray[np.uint8]  # [P, L, k]
    num_fallback: int  # positions whose token id had no routing data
    num_tokenized: int  # tokens in the (prefix of the) text that was tokenized

    @property
    def num_positions(self) -> int:
        return int(self.topk.shape[0])


def routing_probabilities(
    token_ids: npt.NDArray[np.integer],
    expert_ids: npt.NDArray[np.integer],
    counts: npt.NDArray[np.integer],
    vocab_size: int,
    top_k: int = TOP_K,
    num_experts: int = NUM_EXPERTS,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Per token id, the probability that one occurrence routes to each expert: [V, E], and has-data [V].

    Ids without data get the layer's per-expert shares over all tokens (also summing to top_k).
    """
    if np.any(token_ids < 0) or np.any(expert_ids < 0) or np.any(expert_ids >= num_experts):
        raise InputFileError("routing file holds out-of-range token or expert ids")
    if token_ids.shape != expert_ids.shape or token_ids.shape != counts.shape:
        raise InputFileError("routing file's token_id, expert_id and count arrays differ in length")
    if token_ids.size and int(token_ids.max()) >= MAX_VOCAB:
        raise InputFileError(f"routing file holds token ids >= {MAX_VOCAB} (docs/limits.md)")
    if np.any(counts < 0):
        raise InputFileError("routing file holds negative counts")
    size = max(vocab_size, int(token_ids.max()) + 1 if token_ids.size else 0)
    table = np.zeros((size, num_experts), dtype=np.float64)
    np.add.at(table, (token_ids, expert_ids), counts)
    occurrences = table.sum(axis=1) / top_k
    has_data = occurrences > 0
    total = table.sum(axis=0)
    shares = total / total.sum() * top_k
    if np.any(shares > 1.0 + 1e-9):  # pragma: no cover - never seen in the real data
        raise InputFileError("an expert takes more than every token: the routing file is inconsistent")
    table[has_data] /= occurrences[has_data, None]
    table[~has_data] = shares
    if np.any(table > 1.0 + 1e-9):
        raise InputFileError("a token id routes to one expert more often than it occurs: inconsistent file")
    return table, has_data


def route_positions(
    token_ids: npt.NDArray[np.integer], routing: dict[str, npt.NDArray[Any]], rng: np.random.Generator
) -> tuple[npt.NDArray[np.uint8], int]:
    """Draw each position's top-k per recorded layer: [P, L, k] and the number of fallback positions."""
    vocab = int(token_ids.max()) + 1
    topk = np.empty((token_ids.shape[0], len(LAYERS), TOP_K), dtype=np.uint8)
    fallback = np.zeros(token_ids.shape[0], dtype=bool)
    for idx, layer in enumerate(LAYERS):
        try:
            ids, experts, counts = (
                routing[f"layer{layer}_{name}"] for name in ("token_id", "expert_id", "count")
            )
        except KeyError as exc:
            raise InputFileError(f"routing file lacks {exc.args[0]}") from exc
        table, has_data = routing_probabilities(ids, experts, counts, vocab)
        fallback |= ~has_data[token_ids]
        topk[:, idx] = systematic_topk(table[token_ids], TOP_K, rng)
    return topk, int(fallback.sum())


def prefix_counts(topk: npt.NDArray[np.uint8]) -> npt.NDArray[np.int32]:
    """[P, L, k] top-k ids -> [P + 1, L, E] running counts (row p counts positions < p)."""
    num_positions, num_layers, _ = topk.shape
    cumulative = np.zeros((num_positions + 1, num_layers, NUM_EXPERTS), dtype=np.int32)
    rows = np.arange(1, num_positions + 1)[:, None, None]
    cols = np.arange(num_layers)[None, :, None]
    cumulative[rows, cols, topk] = 1
    np.cumsum(cumulative, axis=0, out=cumulative)
    return cumulative


def tokenize_prefix(text: str, tokenizer: Any, num_tokens: int) -> npt.NDArray[np.int64]:
    """The first `num_tokens` token ids of `text` (or all, if fewer), tokenizing only a prefix."""
    num_chars = 5 * num_tokens
    while True:
        ids = np.asarray(tokenizer.encode(text[:num_chars], add_special_tokens=False).ids, dtype=np.int64)
        # a cut can only change the tokens of the last word: keep a margin of 256 tokens
        if num_chars >= len(text) or ids.shape[0] >= num_tokens + 256:
            return ids[:num_tokens]
        num_chars *= 2


def read_domain(data_dir: Path, domain: str) -> tuple[str, dict[str, npt.NDArray[Any]]]:
    """A domain's text and routing arrays.

    Call it from one thread at a time: numpy parses `.npy` headers with `ast.literal_eval`, which
    CPython 3.11 does not make thread-safe ("AST constructor recursion depth mismatch").
    """
    text_path = data_dir / "olmoe" / "text" / f"{domain}.txt"
    routing_path = data_dir / "olmoe" / f"token_routing_{domain}.npz"
    budget = max_bytes()
    text = read_text(text_path, f"OLMoE text for {domain}", max_bytes=budget, limit_name=MAX_BYTES_ENV)
    return text, read_npz(
        routing_path, f"OLMoE routing file for {domain}", ROUTING_ARRAYS, budget_bytes=budget
    )


def route_text(
    text: str, routing: dict[str, npt.NDArray[Any]], tokenizer: Any, rng: np.random.Generator
) -> RoutedText:
    """Tokenize a domain's text and draw every routed position's top-k (thread-safe)."""
    token_ids = tokenize_prefix(text, tokenizer, ROUTED_TOKENS)
    if token_ids.shape[0] < 2:
        raise InputFileError("an OLMoE text holds fewer than 2 tokens")
    topk, num_fallback = route_positions(token_ids, routing, rng)
    return RoutedText(topk=topk, num_fallback=num_fallback, num_tokenized=int(token_ids.shape[0]))


def route_domain(data_dir: Path, domain: str, tokenizer: Any, rng: np.random.Generator) -> RoutedText:
    text, routing = read_domain(data_dir, domain)
    return route_text(text, routing, tokenizer, rng)


def load_tokenizer(data_dir: Path) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ConfigError("building OLMoE traces needs the tokenizer: pip install 'eldr[trace]'") from exc
    path = data_dir / "olmoe" / "tokenizer.json"
    if not path.is_file():
        raise InputFileError(f"{path} not found: is --data-dir the shared data folder (../shared/data)?")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises its own untyped errors
        raise InputFileError(f"cannot load tokenizer {path}: {exc}") from exc


@dataclass
class _Plan:
    """Per-request lengths, arrivals, labels and windows; counts are filled domain by domain."""

    raw_prompt: npt.NDArray[np.int64]  # [N] Azure lengths before clipping
    raw_output: npt.NDArray[np.int64]
    prompt: npt.NDArray[np.int64]  # [N] clipped
    output: npt.NDArray[np.int64]
    arrival_s: npt.NDArray[np.float64]
    is_calibration: npt.NDArray[np.bool_]
    domain: npt.NDArray[np.str_]
    start: npt.NDArray[np.int64]  # [N] prompt window start in its text
    prefill: npt.NDArray[np.int64]  # [N, L, E]
    decode: npt.NDArray[np.int64]  # [N, L, E]
    splits: dict[str, int]  # domain -> first evaluation position
    num_cut: int = 0  # requests cut to fit their text region


def _plan_requests(
    config: OlmoeConfig, azure: AzureTrace, active: list[str], rng: np.random.Generator
) -> _Plan:
    n, m = config.num_requests, config.num_calibration
    if config.is_replay:
        rows, arrival = replay_rows(azure, n)
    else:
        rows = rng.integers(0, azure.num_rows, size=n)
        arrival = poisson_arrivals(n, config.rate, rng)
    raw_prompt, raw_output = azure.prompt_tokens[rows], azure.output_tokens[rows]
    is_calibration = np.arange(n) < m  # the first m arrivals calibrate, the rest are evaluated
    domain = np.empty(n, dtype=f"<U{max(len(d) for d in DOMAINS)}")
    weights = dict(config.mix)
    for part, size in ((is_calibration, m), (~is_calibration, n - m)):
        alloc = allocate({name: weights[name] for name in active}, size)
        labels = np.repeat(np.array(active), [alloc[name] for name in active])
        domain[part] = rng.permutation(labels)
    return _Plan(
        raw_prompt=raw_prompt,
        raw_output=raw_output,
        prompt=np.clip(raw_prompt, 1, config.max_prompt),
        output=np.clip(raw_output, 1, config.max_output),
        arrival_s=arrival,
        is_calibration=is_calibration,
        domain=domain,
        start=np.zeros(n, dtype=np.int64),
        prefill=np.zeros((n, len(LAYERS), NUM_EXPERTS), dtype=np.int64),
        decode=np.zeros((n, len(LAYERS), NUM_EXPERTS), dtype=np.int64),
        splits={},
    )


def _cut_windows(plan: _Plan, name: str, text: RoutedText, fraction: float, rng: np.random.Generator) -> None:
    """Place the domain's requests in their text regions and fill their counts (prefix-sum differences)."""
    cum = prefix_counts(text.topk)  # [P + 1, L, E]
    split = int(text.num_positions * fraction)
    plan.splits[name] = split
    prompt, output = plan.prompt, plan.output
    for part, lo, hi in ((plan.is_calibration, 0, split), (~plan.is_calibration, split, text.num_positions)):
        idx = np.flatnonzero(part & (plan.domain == name))
        if idx.size == 0:
            continue
        if hi - lo < 2:
            raise InvalidInputError(f"{name}: a text region of {hi - lo} tokens cannot hold a request")
        output[idx] = np.minimum(output[idx], hi - lo - 1)
        plan.num_cut += int(np.sum(prompt[idx] + output[idx] > hi - lo))
        prompt[idx] = np.minimum(prompt[idx], hi - lo - output[idx])
        span = prompt[idx] + output[idx]
        start = lo + (rng.random(idx.size) * (hi - lo - span + 1)).astype(np.int64)
        plan.prefill[idx] = cum[start + prompt[idx]] - cum[start]
        plan.decode[idx] = cum[start + span] - cum[start + prompt[idx]]
        plan.start[idx] = start


def _exact_decode(
    plan: _Plan, routed: dict[str, RoutedText]
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Every output window's routed positions, request after request: [sum(output), L, k] and offsets."""
    offsets = np.concatenate([[0], np.cumsum(plan.output)]).astype(np.int64)
    begin = plan.start + plan.prompt
    chunks = [
        routed[str(plan.domain[i])].topk[begin[i] : begin[i] + plan.output[i]]
        for i in range(plan.output.size)
    ]
    return np.concatenate(chunks, axis=0), offsets


def _meta(config: OlmoeConfig, plan: _Plan, routed: dict[str, RoutedText]) -> dict[str, Any]:
    return {
        "source": "olmoe",
        "builder": f"eldr {__version__} trace build olmoe",
        "attribution": ATTRIBUTION,
        "model": "allenai/OLMoE-1B-7B (64 experts, top-8, 16 MoE layers)",
        "config": {
            "num_requests": config.num_requests,
            "num_calibration": config.num_calibration,
            "arrivals": "azure-replay" if config.is_replay else f"poisson {config.rate} req/s",
            "azure": config.azure,
            "max_prompt": config.max_prompt,
            "max_output": config.max_output,
            "calibration_fraction": config.calibration_fraction,
            "mix": dict(config.mix),
            "seed": config.seed,
            "exact_decode": config.is_exact_decode,
        },
        "clipping": {
            "prompt_clipped": int(np.sum(plan.raw_prompt > config.max_prompt)),
            "output_clipped": int(np.sum(plan.raw_output > config.max_output)),
            "cut_to_fit_region": plan.num_cut,
        },
        "fallback_positions": {name: text.num_fallback for name, text in routed.items()},
        "routed_positions": {name: text.num_positions for name, text in routed.items()},
        # calibration windows lie in text positions [0, split), evaluation windows in [split, P)
        "calibration_split": plan.splits,
    }


def build_olmoe_trace(
    data_dir: str | Path, config: OlmoeConfig, on_step: Callable[[str], None] | None = None
) -> Trace:
    """Build the trace; `on_step(description)` is called after each domain (for progress bars)."""
    data_dir = Path(data_dir)
    rng = np.random.default_rng(config.seed)
    tokenizer = load_tokenizer(data_dir)
    azure = load_azure(data_dir / "workloads" / f"azure2023_{config.azure}.csv")
    active = [name for name, weight in config.mix if weight > 0]
    plan = _plan_requests(config, azure, active, rng)
    routed: dict[str, RoutedText] = {}
    # domains are routed on two threads (numpy and the tokenizer release the GIL), each with its own
    # seeded generator; windows are cut in mix order, so the result does not depend on the threads
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(
                route_text,
                *read_domain(data_dir, name),  # files read here, in this thread, one after another
                tokenizer,
                np.random.default_rng([config.seed, DOMAINS.index(name)]),
            )
            for name in active
        }
        for name in active:
            routed[name] = futures[name].result()
            _cut_windows(plan, name, routed[name], config.calibration_fraction, rng)
            if on_step is not None:
                on_step(f"routed {name}")
    decode_topk, decode_offsets = _exact_decode(plan, routed) if config.is_exact_decode else (None, None)
    longest = max(int(plan.prompt.max()), int(plan.output.max()))
    count_dtype = np.uint16 if longest <= np.iinfo(np.uint16).max else np.int32
    return Trace(
        prefill_counts=plan.prefill.astype(count_dtype),
        decode_counts=plan.decode.astype(count_dtype),
        prompt_tokens=plan.prompt.astype(np.int64),
        output_tokens=plan.output.astype(np.int64),
        arrival_s=plan.arrival_s.astype(np.float64),
        top_k=TOP_K,
        layers=np.array(LAYERS, dtype=np.int64),
        num_model_layers=NUM_MODEL_LAYERS,
        domain=plan.domain,
        calibration=plan.is_calibration,
        decode_topk=decode_topk,
        decode_offsets=decode_offsets,
        text_offset=plan.start,
        meta=_meta(config, plan, routed),
    )
