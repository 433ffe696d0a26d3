"""Active health checks against a scripted engine."""

from __future__ import annotations

from test_upstream import ScriptedServer, answer, respond, run

from eldr.proxy.health import check_worker
from eldr.proxy.upstream import UpstreamClient
from eldr.proxy.workers import Worker


def test_health_check_never_raises_on_an_odd_models_list() -> None:
    """A `/v1/models` answering `{"data": null}` is no list of models, not a crash of the health loop."""

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer(
            [respond(answer(b"")), respond(answer(b'{"object": "list", "data": null}'))]
        ).start()
        worker = Worker(srv.url, "decode")
        assert await check_worker(client, worker, timeout_s=2, is_blended=False)
        assert worker.models == ()
        await srv.stop()

    run(test)
