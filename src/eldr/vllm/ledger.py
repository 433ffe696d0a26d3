"""Scheduler side: which request's counts are ready when, and the payload they leave with.

vLLM 0.32 calls `request_finished` (which returns the answer's `kv_transfer_params`) *before*
`update_connector_output` delivers the same step's worker data: for a prefill-only request
(`max_tokens: 1`) the data of its last prefill step arrives after it finished. The ledger therefore
hands `request_finished` a params dict and fills `params["eldr"]` when the next step data is applied,
which vLLM does in the same `update_from_output` call, before the answer is serialised
(`tests/e2e/test_plugin_signatures.py` checks every answer carries exact counts).

Bookkeeping per engine step: `begin_step` numbers the step; `prefill_due` records the requests whose
prefill completes in it (with their prompt blocks); `apply(step, delta)` folds the workers' block rows
into the `BlockSignatureCache`, snapshots the prompt counts of requests due at that step and fills the
params of requests that finished meanwhile. A step whose data never arrived (or arrived broken)
invalidates the whole cache: counts are then refused until blocks are rewritten, never guessed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from eldr.payload import DECODE_PAYLOAD_KEY, PAYLOAD_KEY, encode_counts
from eldr.vllm.blockcache import BlockDelta, BlockSignatureCache

logger = logging.getLogger(__name__)


@dataclass
class _Tracked:
    num_prompt_tokens: int
    prompt_counts: npt.NDArray[np.int64] | None = None
    is_external: bool = False


@dataclass
class _Finished:
    params: dict[str, Any]
    block_ids: list[int]
    num_computed_tokens: int
    tracked: _Tracked


@dataclass
class SignatureLedger:
    """Signature cache plus the per-request, per-step bookkeeping of one engine's scheduler."""

    num_blocks: int
    block_size: int
    is_recording_decode: bool = False
    cache: BlockSignatureCache | None = None
    top_k: int = 0
    _requests: dict[str, _Tracked] = field(default_factory=dict)
    _due: dict[int, list[tuple[_Tracked, list[int]]]] = field(default_factory=dict)
    _finished: list[_Finished] = field(default_factory=list)
    _expected_steps: list[int] = field(default_factory=list)
    _pending_invalid: list[int] = field(default_factory=list)  # invalidated before the cache exists
    _step: int = 0

    def track(self, req_id: str, num_prompt_tokens: int) -> None:
        if req_id not in self._requests:
            self._requests[req_id] = _Tracked(num_prompt_tokens)

    def mark_external(self, req_id: str, block_ids: list[int]) -> None:
        """The request's KV for `block_ids` came from elsewhere: no counts for it, rows untrusted."""
        if req_id in self._requests:
            self._requests[req_id].is_external = True
        if self.cache is not None and block_ids:
            self.cache.invalidate(block_ids)
        self._pending_invalid.extend(block_ids)

    def begin_step(self, num_tokens: int) -> int:
        self._step += 1
        if num_tokens > 0:
            self._expected_steps.append(self._step)
        return self._step

    def prefill_due(self, step: int, req_id: str, prompt_block_ids: list[int]) -> None:
        tracked = self._requests.get(req_id)
        if tracked is not None:
            self._due.setdefault(step, []).append((tracked, prompt_block_ids))

    def apply(self, step: int, delta: BlockDelta | None, top_k: int) -> list[dict[str, Any]]:
        """Fold step `step`'s rows (`None`: the step's data is unusable) and resolve what waited on it.

        Returns the params dicts that received a payload.
        """
        missed = [s for s in self._expected_steps if s < step]
        self._expected_steps = [s for s in self._expected_steps if s > step]
        if delta is not None and self.cache is None:
            _, num_layers, num_experts = delta.counts.shape
            self.cache = BlockSignatureCache(self.num_blocks, num_layers, num_experts, self.block_size)
            self.cache.invalidate(self._pending_invalid)
        self._pending_invalid = []
        self.top_k = top_k or self.top_k
        if self.cache is not None:
            if missed or delta is None:
                logger.warning(
                    "eldr: step data missing or unusable (steps %s, %s); cache reset", missed, step
                )
                self.cache.is_valid[:] = False
            if delta is not None:
                self.cache.apply(delta)
        for due_step in sorted(s for s in self._due if s <= step):
            for tracked, block_ids in self._due.pop(due_step):
                tracked.prompt_counts = self._sum(block_ids, tracked)
        finished, self._finished = self._finished, []
        return [item.params for item in finished if self._fill(item)]

    def finish(
        self, req_id: str, block_ids: list[int], num_computed_tokens: int, params: dict[str, Any]
    ) -> bool:
        """Register a finished request; its payload lands in `params` at the next `apply`.

        Returns False when no payload can come (prefill never completed here), so the caller can
        leave vLLM's params untouched.
        """
        tracked = self._requests.pop(req_id, None)
        if tracked is None or tracked.is_external or num_computed_tokens < tracked.num_prompt_tokens:
            return False
        self._finished.append(_Finished(params, block_ids, num_computed_tokens, tracked))
        return True

    @property
    def num_tracked(self) -> int:
        return len(self._requests) + len(self._finished)

    def _sum(self, block_ids: list[int], tracked: _Tracked) -> npt.NDArray[np.int64] | None:
        if self.cache is None or tracked.is_external:
            return None
        return self.cache.sum_rows(block_ids)

    def _fill(self, item: _Finished) -> bool:
        prompt = item.tracked.prompt_counts
        num_prompt = item.tracked.num_prompt_tokens
        if prompt is None or not _conserves(prompt, num_prompt, self.top_k):
            return False
        item.params[PAYLOAD_KEY] = encode_counts(prompt, num_tokens=num_prompt, top_k=self.top_k)
        if not self.is_recording_decode:
            return True
        total = self._sum(item.block_ids, item.tracked)
        num_decode = item.num_computed_tokens - num_prompt
        if total is None:
            return True
        decode = total - prompt
        if bool((decode >= 0).all()) and _conserves(decode, num_decode, self.top_k):
            item.params[DECODE_PAYLOAD_KEY] = encode_counts(decode, num_tokens=num_decode, top_k=self.top_k)
        return True


def _conserves(counts: npt.NDArray[np.int64], num_tokens: int, top_k: int) -> bool:
    """Every layer of `counts` (sums of unsigned rows, or checked >= 0) sums to tokens x k."""
    is_ok = all(total == num_tokens * top_k for total in counts.sum(axis=1).tolist())
    if not is_ok:
        logger.warning("eldr: counts do not sum to %d tokens x top-%d; payload left out", num_tokens, top_k)
    return is_ok
