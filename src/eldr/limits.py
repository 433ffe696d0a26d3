"""Every limit eldr puts on its inputs, in one place (docs/limits.md lists them with their reasons).

Input files are refused before anything is allocated when they would take more memory than
`max_bytes()`: 2 GiB by default, or the `ELDR_MAX_BYTES` environment variable (bytes, a positive
integer; read when a command runs). The same budget bounds the decode-token plan of `eldr simulate`
and the sampled batches of `eldr trace info`. Arrays are counted at 8 bytes per element or their own
item size when larger, since eldr widens counts to int64 and times to float64.
"""

from __future__ import annotations

import os

from eldr.errors import ConfigError

GIB = 1024**3
MIB = 1024**2

MAX_BYTES_ENV = "ELDR_MAX_BYTES"
DEFAULT_MAX_BYTES = 2 * GIB  # memory one input file (or one simulated token plan) may take

# .npz / .npy structure
MAX_NPZ_MEMBERS = 1024  # arrays in one .npz (eldr's own files hold at most 15)
MAX_NPZ_DIRECTORY_BYTES = 1 * MIB  # the zip's central directory
MAX_NPY_HEADER_BYTES = 10_000  # an .npy header (numpy's own default)
MAX_COUNT = 2**40  # one expert count: sums over layers and requests stay far from int64 overflow
MAX_LENGTH = 2**31 - 1  # prompt_tokens, output_tokens of a trace request

MAX_VOCAB = 1 << 20  # token ids of the OLMoE routing files (`eldr trace build olmoe`)

# text inputs
MAX_CONFIG_BYTES = 1 * MIB  # eldr serve --config
MAX_PROMPTS_BYTES = 256 * MIB  # eldr capture --prompts
MAX_COST_MODEL_BYTES = 64 * 1024  # eldr simulate --cost-model FILE.json (a dozen numbers)
MAX_ENGINE_ANSWER_BYTES = 64 * MIB  # one engine answer read by eldr capture

# flags (and the serve config's numbers)
MAX_WORKERS = 4096  # decode workers: fit, simulate, demo, route --loads entries
MAX_REFIT_WINDOW = 100_000  # signatures an online refit may cluster (memory: window x L x E floats)
MAX_REQUESTS = 10_000_000  # --requests, --num-requests, --num-calibration, --calibration
MAX_TOKENS = 1_048_576  # --output-tokens, --max-prompt, --max-output, --decode-tokens
MAX_BATCH = 65_536  # --max-batch, each of --batch-sizes
MAX_BATCH_SIZES = 16  # entries of --batch-sizes
MAX_STEPS = 100_000  # trace info --steps
MAX_KV_TOKENS = 2**40  # --kv-capacity
MAX_ITER = 10_000  # fit --max-iter
FIT_BYTES_PER_ASSIGNMENT = 128  # balanced k-means holds ~this per (request, worker) pair (HiGHS LP)
MAX_DOMAINS = 1024  # distinct domain labels `eldr trace info` computes statistics for
MIN_PAIRS = 10  # fit --pairs
MAX_PAIRS = 10_000_000  # fit --pairs
MAX_SEED = 2**63 - 1  # every --seed (>= 0)
MAX_LOAD = 2**31 - 1  # each in-flight count of route --loads
MAX_RATE = 1e6  # requests per second: --rate
MAX_TIMEOUT_S = 86_400.0  # every timeout and interval, capture --timeout
MAX_CONCURRENCY = 256  # capture --concurrency (threads)
MAX_IDF = 1000.0  # a partition's IDF weights (log((N + 1) / (df + 1)) stays below 50 for any real N)
UNIT_NORM_TOLERANCE = 1e-3  # |1 - ||centroid|||: partition centroids are unit vectors


def max_bytes() -> int:
    """The memory budget of one input: `ELDR_MAX_BYTES` when set, else `DEFAULT_MAX_BYTES`."""
    text = os.environ.get(MAX_BYTES_ENV)
    if text is None or not text.strip():
        return DEFAULT_MAX_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{MAX_BYTES_ENV} must be a positive number of bytes, got {text!r}")
    return value


def size_text(num_bytes: float) -> str:
    """`1536` -> '1.5 KiB': sizes in error messages."""
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.3g} {unit}"
    return f"{int(num_bytes)} bytes"
