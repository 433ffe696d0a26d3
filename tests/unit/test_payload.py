from __future__ import annotations

import base64

import numpy as np
import pytest

from eldr.errors import InvalidInputError
from eldr.payload import decode_counts, encode_counts


def test_round_trip_uses_8_bits_when_counts_fit() -> None:
    counts = np.array([[3, 1, 0, 0], [0, 2, 2, 0]])
    payload = encode_counts(counts, num_tokens=2, top_k=2)
    assert payload["dtype"] == "<u1" and payload["v"] == 1
    assert len(base64.b64decode(payload["counts"])) == 8
    np.testing.assert_array_equal(decode_counts(payload), counts)


def test_round_trip_uses_16_bits_above_255() -> None:
    counts = np.array([[256, 44], [150, 150]])
    payload = encode_counts(counts, num_tokens=150, top_k=2)
    assert payload["dtype"] == "<u2"
    assert len(base64.b64decode(payload["counts"])) == 4 * 2
    np.testing.assert_array_equal(decode_counts(payload), counts)


def test_round_trip_widens_for_large_counts() -> None:
    counts = np.array([[70_000, 70_000]])
    payload = encode_counts(counts, num_tokens=70_000, top_k=2)
    assert payload["dtype"] == "<u4"
    np.testing.assert_array_equal(decode_counts(payload), counts)


def _good() -> dict[str, object]:
    return encode_counts(np.array([[1, 1], [2, 0]]), num_tokens=1, top_k=2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v": 2}, "version"),
        ({"counts": "!!!"}, "malformed"),
        ({"dtype": "<f4"}, "malformed"),
        ({"layers": 3}, "bytes"),
        ({"num_tokens": 5}, "expected 5 tokens"),
        ({"layers": None}, "malformed"),
    ],
    ids=["version", "base64", "dtype", "shape", "conservation", "null"],
)
def test_malformed_payloads_are_rejected(change: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        decode_counts({**_good(), **change})


def test_non_object_payload_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="must be an object"):
        decode_counts([1, 2])
