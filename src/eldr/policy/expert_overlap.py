"""`fewest-new-experts`: route to the decode worker whose running batch the request adds the fewest
expected experts to, counting what the request costs the batch and the batch costs the request.

Beyond the paper (issue 16). ELDR compares a request with a static centroid per worker; this policy
looks at what each worker is decoding now. It keeps, per worker, the experts its in-flight requests
are expected to use, and asks the question of the paper's cost model (§3: a decode step costs about
linearly in the distinct experts its batch reads) for every healthy worker.

Request activation. From prefill counts c[l, e] and T_l = sum_e c[l, e] / top_k prompt tokens:

    p[l, e] = min(c[l, e] / T_l, P_MAX)        one decode token's chance to use expert e at layer l

Worker state. For the in-flight requests r on worker w (dispatched, not released):

    A_w[l, e] = prod_r (1 - p_r[l, e])          chance that no request of w's batch uses (l, e)

The exact state is log A_w in float64 (`+= log(1 - p)` per dispatch, `-=` at release, O(L x E)
each): a product would underflow to 0 under ~50 requests that all use an expert, and a division
never brings it back. Scoring reads a float32 copy A_w, multiplied by (1 - p) at dispatch (floored
at ABSENT_FLOOR: subnormal floats are slow and the terms nil) and re-derived as exp(log A_w) at
every release. To keep the decision fast, a dispatch only updates the copy and queues its factor;
the queued factors enter log A_w at the worker's next release. A worker's row is reset to exactly
"nothing in flight" when it holds no request, and recomputed from the live set every
`RECOMPUTE_EVERY` releases, which bounds rounding drift.

Score. With omega_l the model layers signature layer l stands for (1 each for a real engine's
signature; the simulator's layer map otherwise), B_w the worker's in-flight count and

    D_w = sum_{l,e} omega_l (1 - A_w[l, e])     expected distinct experts w's next step reads
    m_w = sum_{l,e} omega_l p[l, e] A_w[l, e]    expected experts the request adds to it

    score_w = D_w + (B_w + 1) m_w + lam B_w,     pick argmin over healthy workers (ties: lower index)

Where that comes from: the step-cost model (`eldr.sim.costmodel`) is
step = const + c_exp * (distinct experts, over model layers) + c_req * B, where c_req is the
per-request part (per_request_s + attention over the request's context). Sending the request to w
raises the total time-per-token of w's requests, the new one included, by

    t_w + (B_w + 1) dt_w = const + c_exp (D_w + (B_w + 1) m_w) + c_req (2 B_w + 1)

(the newcomer decodes at w's step time t_w plus its own dt_w; each of the B_w others slows by dt_w =
c_exp m_w + c_req). In units of c_exp, and without the terms equal for every worker, that is the
score with

    lam = 2 c_req / c_exp = 2 (per_request_s + attn_per_token_s * context) / (per_expert_s * E_model / E_sig)

`context` is the mean context length of a running request (prompt + half the output). `lam_of` does
this for a cost model; `DEFAULT_LAM` is it for Qwen3-30B-A3B on MI300X (`mi300x-qwen3-30b`:
per_request_s = 0, 37.5 ns per context token, 3.6 µs per expert and layer) with a signature of the
model's own experts (E_model = E_sig) and a 1,000-token context: 2 x 37.5 ns x 1000 / 3.6 µs = 20.8.
The D_w term matters as much as the marginal: without it a saturated worker (m_w ~ 0) would look
free and take every request.

Requests without usable counts (none, wrong shape, negative or non-finite, all zero) go to the
least-loaded healthy worker (ties uniformly at random, seeded), marked as a fallback, and are still
recorded so that `release` treats every dispatched id alike. Request ids must be unique among live
requests (`DuplicateRequestError`); `release` of an unknown or released id does nothing.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from eldr.errors import ConfigError, DuplicateRequestError, NoHealthyWorkerError, PartitionMismatchError
from eldr.policy.base import Decision, RequestView, WorkersView, check_weight, least_loaded

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]

P_MAX = 1.0 - 1e-6  # an expert every prompt token chose is not certain for every decode token
# relative: scores this close tie (the float32 matvec sums identical rows in different orders)
SCORE_TIE = 1e-5
# A's float32 copy never goes below this: its terms are then nil anyway, and subnormal floats would
# make every product and matvec over the row many times slower
ABSENT_FLOOR = np.float32(1e-30)
RECOMPUTE_EVERY = 1024  # releases on one worker between recomputations of its row from the live set
DEFAULT_CONTEXT_TOKENS = 1000.0
# 2 * attn_per_token_s * context / per_expert_s for mi300x-qwen3-30b (98,304 B and 9.437 MB at one
# bandwidth: 2 * 98304 * 1000 / 9437184), E_model = E_sig
DEFAULT_LAM = 2 * 98_304 * DEFAULT_CONTEXT_TOKENS / (3 * 2048 * 768 * 2)


def check_lam(lam: float) -> float:
    """`lam` as a float if it is finite and >= 0, else a ConfigError."""
    return check_weight("lam", lam)


def lam_of(
    *, per_request_s: float, attn_per_token_s: float, per_expert_s: float, expert_scale: float, context: float
) -> float:
    """The load weight the step-cost model implies (module docstring), in expert-layer reads."""
    if not per_expert_s > 0 or not expert_scale > 0:
        raise ConfigError("lam needs a positive cost per expert")
    return check_lam(2.0 * (per_request_s + attn_per_token_s * context) / (per_expert_s * expert_scale))


def activation(counts: npt.NDArray[np.generic], top_k: int) -> F32 | None:
    """p[l, e] `[L * E]` (float32) from prefill counts `[L, E]`, or None when they are unusable."""
    kind = counts.dtype.kind
    if counts.ndim != 2 or kind not in "biuf" or counts.size == 0:
        return None
    values = counts.astype(np.float32)
    if kind == "f" and not np.isfinite(values).all():
        return None
    if kind != "u" and values.min() < 0:
        return None
    sums = values.sum(axis=1)  # [L] = T_l x top_k
    if not sums.any():
        return None
    values *= (top_k / np.maximum(sums, 1e-30))[:, None]  # a layer without counts stays 0
    np.minimum(values, P_MAX, out=values)
    return values.reshape(-1)


class FewestNewExpertsPolicy:
    """Route to the worker with the lowest expected added step cost (module docstring)."""

    name = "fewest-new-experts"

    def __init__(
        self,
        num_workers: int,
        top_k: int,
        *,
        lam: float = DEFAULT_LAM,
        layer_weights: npt.ArrayLike | None = None,
        shape: tuple[int, int] | None = None,
        seed: int = 0,
    ) -> None:
        if num_workers < 1 or top_k < 1:
            raise ConfigError(f"workers and top_k must be >= 1, got {num_workers} and {top_k}")
        self.top_k = int(top_k)
        self.lam = check_lam(lam)
        self.num_workers = int(num_workers)
        self._layer_weights = None if layer_weights is None else np.asarray(layer_weights, np.float64)
        self._rng = np.random.default_rng(seed)
        self._live: dict[str, tuple[int, F32 | None]] = {}  # id -> (worker, 1 - p [L * E])
        self._pending: list[list[F32]] = [[] for _ in range(num_workers)]  # 1 - p not yet in log A
        self._held = [0] * num_workers  # live requests with counts, per worker
        self._releases = [0] * num_workers  # since the row's last recomputation
        self.shape: tuple[int, int] | None = None
        if shape is not None:
            self._set_shape(shape)

    def _set_shape(self, shape: tuple[int, int]) -> None:
        num_layers, num_experts = int(shape[0]), int(shape[1])
        weights = np.ones(num_layers) if self._layer_weights is None else self._layer_weights
        if weights.shape != (num_layers,) or not np.isfinite(weights).all() or weights.min() < 0:
            raise ConfigError(f"layer weights must be {num_layers} finite numbers >= 0, got {weights}")
        size = num_layers * num_experts
        self.shape = (num_layers, num_experts)
        self._omega64 = np.repeat(weights, num_experts)  # [L * E]
        self._omega = self._omega64.astype(np.float32)
        self._is_unweighted = bool((weights == 1.0).all())
        self._total = float(weights.sum() * num_experts)  # D_w of a worker whose batch uses everything
        self._log_absent = np.zeros((self.num_workers, size))  # [W, L * E] log A, the exact state
        self._absent = np.ones((self.num_workers, size), dtype=np.float32)  # [W, L * E] A, for scoring
        self._kept = np.full(self.num_workers, self._total)  # [W] sum omega A_w = total - D_w

    @property
    def live_ids(self) -> frozenset[str]:
        """Ids dispatched and not released."""
        return frozenset(self._live)

    def choose(self, request: RequestView, workers: WorkersView) -> Decision:
        if workers.num_workers != self.num_workers:
            raise PartitionMismatchError(
                f"{self.name} tracks {self.num_workers} decode workers, the pool has {workers.num_workers}"
            )
        if request.request_id in self._live:
            raise DuplicateRequestError(f"request id {request.request_id!r} is already in flight")
        p = self._activation(request)
        if p is None:
            worker = least_loaded(workers.healthy_indices(), workers, self._rng)
            self._live[request.request_id] = (worker, None)
            return Decision(worker, is_fallback=True)
        added = self._added(p)
        worker = self._pick(self._score(added, workers))
        self._record(request.request_id, p, worker, float(added[worker]))
        return Decision(worker)

    def dispatch(self, request: RequestView, worker: int) -> None:
        """Record a request already running on `worker` (e.g. `eldr route --in-flight`), as `choose`
        records the requests it routes."""
        if not 0 <= worker < self.num_workers:
            raise ConfigError(f"worker {worker} is not one of the {self.num_workers} decode workers")
        if request.request_id in self._live:
            raise DuplicateRequestError(f"request id {request.request_id!r} is already in flight")
        p = self._activation(request)
        if p is None:
            self._live[request.request_id] = (worker, None)
        else:
            self._record(request.request_id, p, worker, float(self._added(p)[worker]))

    def release(self, request_id: str) -> None:
        """Forget a dispatched request (its decode ended, however); unknown ids are ignored."""
        entry = self._live.pop(request_id, None)
        if entry is None:
            return
        worker, absent = entry
        if absent is None:
            return
        self._held[worker] -= 1
        self._releases[worker] += 1
        if self._releases[worker] >= RECOMPUTE_EVERY or not self._held[worker]:
            self.recompute(worker)
            return
        row = self._log_absent[worker]
        for queued in self._pending[worker]:
            row += _log(queued)
        self._pending[worker].clear()
        row -= _log(absent)
        self._refresh(worker)

    def recompute(self, worker: int) -> None:
        """Rebuild one worker's row from the live set (exactly "nothing in flight" when it is empty)."""
        row = self._log_absent[worker]
        row[:] = 0.0
        self._pending[worker].clear()
        self._releases[worker] = 0
        if not self._held[worker]:
            self._absent[worker] = 1.0
            self._kept[worker] = self._total
            return
        for owner, absent in self._live.values():
            if owner == worker and absent is not None:
                row += _log(absent)
        self._refresh(worker)

    def add_worker(self) -> None:
        """A decode worker appended to the pool, with nothing in flight."""
        self.num_workers += 1
        self._pending.append([])
        self._held.append(0)
        self._releases.append(0)
        if self.shape is not None:
            self._log_absent = np.vstack([self._log_absent, np.zeros((1, self._log_absent.shape[1]))])
            self._absent = np.vstack([self._absent, np.ones((1, self._absent.shape[1]), np.float32)])
            self._kept = np.append(self._kept, self._total)

    def remove_worker(self, index: int) -> None:
        """Worker `index` left the pool; its live requests are forgotten, later workers move down."""
        if not 0 <= index < self.num_workers or self.num_workers == 1:
            raise ConfigError(f"cannot remove worker {index} of {self.num_workers}")
        self._live = {rid: (w - (w > index), f) for rid, (w, f) in self._live.items() if w != index}
        self.num_workers -= 1
        for per_worker in (self._pending, self._held, self._releases):
            del per_worker[index]
        if self.shape is not None:
            self._log_absent = np.delete(self._log_absent, index, axis=0)
            self._absent = np.delete(self._absent, index, axis=0)
            self._kept = np.delete(self._kept, index)

    def scores(self, request: RequestView, workers: WorkersView) -> F64 | None:
        """score_w `[W]` for a request (inf for unhealthy workers), or None without usable counts."""
        p = self._activation(request)
        return None if p is None else self._score(self._added(p), workers)

    def _activation(self, request: RequestView) -> F32 | None:
        counts = request.counts
        if counts is None or counts.ndim != 2:
            return None
        if self.shape is None:
            if activation(counts, self.top_k) is None:
                return None
            self._set_shape((int(counts.shape[0]), int(counts.shape[1])))
        if counts.shape != self.shape:
            return None
        return activation(counts, self.top_k)

    def _added(self, p: F32) -> F32:
        """m_w `[W]`: expected experts (weighted by layer) the request adds to each worker's batch."""
        q: F32 = p if self._is_unweighted else np.multiply(p, self._omega, dtype=np.float32)
        added: F32 = self._absent @ q
        return added

    def _score(self, added: F32, workers: WorkersView) -> F64:
        """score_w = D_w + (B_w + 1) m_w + lam B_w `[W]`, inf for unhealthy workers."""
        load = workers.in_flight
        score: F64 = (self._total - self._kept) + added + load * (added + self.lam)
        return score if workers.healthy.all() else np.where(workers.healthy, score, np.inf)

    @staticmethod
    def _pick(score: F64) -> int:
        """The lowest score; scores within SCORE_TIE of it tie, and ties go to the lower index."""
        best = float(score.min())
        if best == np.inf:
            raise NoHealthyWorkerError("no healthy decode worker")
        return int(np.flatnonzero(score <= best + SCORE_TIE * max(abs(best), 1.0))[0])

    def _record(self, request_id: str, p: F32, worker: int, added: float) -> None:
        """Add the request to `worker`'s float32 copy now (A *= 1 - p, sum omega A -= m_w) and queue
        its factor for the exact state (folded in at the worker's next release)."""
        absent = 1.0 - p  # [L * E] float32, >= 1 - P_MAX
        self._live[request_id] = (worker, absent)
        self._pending[worker].append(absent)
        self._held[worker] += 1
        row = self._absent[worker]
        row *= absent
        np.maximum(row, ABSENT_FLOOR, out=row)
        self._kept[worker] -= added

    def _refresh(self, worker: int) -> None:
        row = self._absent[worker]
        row[:] = np.exp(self._log_absent[worker])
        np.maximum(row, ABSENT_FLOOR, out=row)
        self._kept[worker] = float(np.dot(row, self._omega64))


def _log(absent: F32) -> F64:
    """log(1 - p) in float64 of a stored factor: the same value whenever it is added or subtracted."""
    return np.log(absent, dtype=np.float64)
