"""`eldr route --policy fewest-new-experts --in-flight FILE.npz`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eldr.cli import main
from eldr.policy import FewestNewExpertsPolicy, RequestView, WorkersView

L, E, K = 2, 6, 2


def block(first: int, tokens: int = 4) -> np.ndarray:
    """Counts of `tokens` prompt tokens that all chose experts first, first + 1 at every layer."""
    counts = np.zeros((L, E), dtype=np.int64)
    counts[:, first : first + K] = tokens
    return counts


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    running = np.stack([block(0), block(2), block(2), block(4)])
    np.savez(tmp_path / "inflight.npz", counts=running, worker=np.array([0, 1, 1, 2]))
    np.savez(tmp_path / "idle.npz", counts=np.zeros((0, L, E), np.int64), worker=np.zeros(0, np.int64))
    np.save(tmp_path / "request.npy", block(2))
    return {
        name: tmp_path / f"{name}.{'npy' if name == 'request' else 'npz'}"
        for name in ("inflight", "idle", "request")
    }


def route(files: dict[str, Path], *extra: str) -> list[str]:
    return [
        "route",
        "--policy",
        "fewest-new-experts",
        "--counts",
        str(files["request"]),
        "--top-k",
        str(K),
        *extra,
    ]


def test_it_routes_like_the_policy_seeded_with_the_running_requests(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = route(files, "--in-flight", str(files["inflight"]), "--loads", "1,2,1", "--lam", "0", "--json")
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    policy = FewestNewExpertsPolicy(3, K, lam=0.0, shape=(L, E))
    for j, (counts, worker) in enumerate(((block(0), 0), (block(2), 1), (block(2), 1), (block(4), 2))):
        policy.dispatch(RequestView(str(j), counts), worker)
    expected = policy.scores(RequestView("r", block(2)), WorkersView.of([1, 2, 1]))
    assert expected is not None
    assert out["worker"] == 1 == int(np.argmin(expected))  # the batch already running its experts
    np.testing.assert_allclose(out["scores"], expected, rtol=1e-4)
    assert main([*argv[:-3], "--lam", "1000", "--json"]) == 0  # a heavy load term: the lighter worker
    assert json.loads(capsys.readouterr().out)["worker"] == 0


def test_an_idle_pool_goes_to_the_lowest_index(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(route(files, "--in-flight", str(files["idle"]), "--loads", "0,0")) == 0
    assert capsys.readouterr().out.startswith("worker 0  score")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--loads", "1,2"], "needs --in-flight"),
        (["--in-flight", "IN", "--loads", "0,2,1"], "--loads gives worker 0 0 in-flight requests"),
        (["--in-flight", "IN", "--loads", "1,2"], "every worker must be in [0, 2)"),
        (["--in-flight", "/nonexistent.npz", "--loads", "1,2,1"], "nonexistent"),
    ],
    ids=["no-in-flight", "loads-below-in-flight", "worker-out-of-range", "missing-file"],
)
def test_bad_input_is_one_line_and_status_2(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    extra = [str(files["inflight"]) if x == "IN" else x for x in extra]
    assert main(route(files, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_top_k_is_needed(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["route", "--policy", "fewest-new-experts", "--counts", str(files["request"])]
    assert main([*argv, "--in-flight", str(files["idle"]), "--loads", "0,0"]) == 2
    assert "needs --top-k" in capsys.readouterr().err
    assert main(["route", "--counts", str(files["request"]), "--loads", "0,0"]) == 2
    assert "--policy eldr needs --partition" in capsys.readouterr().err
