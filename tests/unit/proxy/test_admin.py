"""`eldr.proxy.admin` on its own: the admin routes over a `ProxyState`, no engines, no server.

What the routes add to `ProxyState`'s typed pool methods: the token, the body, the host allowlist and
the HTTP status of each refusal.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from eldr.partition import Partition
from eldr.proxy.admin import admin_routes
from eldr.proxy.config import ServeConfig
from eldr.proxy.state import ProxyState

DECODE = tuple(f"http://127.0.0.1:{8100 + w}" for w in range(4))
AUTH = {"Authorization": "Bearer tok"}
CHECKS: list[int] = []  # pool size at each health check the routes asked for


@pytest.fixture
def admin(partition: Partition) -> Iterator[tuple[TestClient, ProxyState]]:
    config = ServeConfig(
        prefill=("http://127.0.0.1:8000",), decode=DECODE, partition="p.npz", admin_token="tok"
    )
    state = ProxyState(config, partition)

    async def check_health() -> None:  # no engines here: note the checks an add asks for
        CHECKS.append(len(state.decode))

    state.check_health = check_health  # type: ignore[method-assign]
    app = Starlette(routes=admin_routes())
    app.state.proxy = state
    with TestClient(app) as client:
        yield client, state


def test_the_token_is_required_and_compared(admin: tuple[TestClient, ProxyState]) -> None:
    client, _ = admin
    assert client.get("/admin/workers").status_code == 401
    assert client.get("/admin/workers", headers={"Authorization": "Bearer nope"}).status_code == 401
    workers = client.get("/admin/workers", headers=AUTH).json()["workers"]
    assert [w["url"] for w in workers if w["role"] == "decode"] == list(DECODE)


def test_add_then_drain(admin: tuple[TestClient, ProxyState]) -> None:
    client, state = admin
    CHECKS.clear()
    added = client.post("/admin/decode", json={"url": "http://127.0.0.1:8200"}, headers=AUTH)
    assert added.status_code == 200 and added.json() == {"added": "http://127.0.0.1:8200", "decode": 5}
    assert CHECKS == [5]  # the new instance is checked before the answer
    assert state.router.band is not None and state.router.band.centroids.shape[0] == 5
    state.decode.workers[0].in_flight = 2  # busy: drained, kept until idle
    drained = client.post("/admin/decode/drain", json={"url": "http://localhost:8100/"}, headers=AUTH)
    assert drained.status_code == 200 and drained.json() == {"draining": DECODE[0], "in_flight": 2}
    assert state.decode.workers[0].is_draining and len(state.decode) == 5


@pytest.mark.parametrize(
    ("path", "body", "status", "text"),
    [
        ("/admin/decode", {"url": "http://127.0.0.1:8101"}, 409, "already in the pool"),
        ("/admin/decode", {"url": "http://10.9.9.9:8101"}, 403, "admin_engine_hosts"),
        ("/admin/decode", {"url": "http://127.0.0.1:8101/v1"}, 400, "must look like http://host:port"),
        ("/admin/decode", {"address": "x"}, 400, "body must be"),
        ("/admin/decode/drain", {"url": "http://127.0.0.1:9999"}, 404, "no decode instance"),
    ],
)
def test_refusals(
    admin: tuple[TestClient, ProxyState], path: str, body: dict[str, str], status: int, text: str
) -> None:
    client, state = admin
    answer = client.post(path, json=body, headers=AUTH)
    assert answer.status_code == status and text in answer.json()["error"]["message"]
    assert [w.url for w in state.decode.workers] == list(DECODE)  # nothing changed


def test_the_last_instance_cannot_be_drained(admin: tuple[TestClient, ProxyState]) -> None:
    client, state = admin
    for url in DECODE[:3]:
        assert client.post("/admin/decode/drain", json={"url": url}, headers=AUTH).status_code == 200
    last = client.post("/admin/decode/drain", json={"url": DECODE[3]}, headers=AUTH)
    assert last.status_code == 409 and "last decode instance" in last.json()["error"]["message"]
    assert len(state.decode) == 1  # the three idle ones were removed at once
