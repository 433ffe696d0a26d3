"""Stop work for a client that has gone: cancel the request's task when its connection closes.

The ASGI server reports a closed client connection as an `http.disconnect` message from `receive`
(once the request body has been read, the next message is that, or nothing until the response is done).
One watcher task per request waits for it and cancels the request's own task, which cancels whatever
it awaits — an upstream request, a stream relay — and so closes those connections too.
"""

from __future__ import annotations

import asyncio

from starlette.types import Receive


class DisconnectWatch:
    """Cancels the current task when the client disconnects (one watcher task per request)."""

    def __init__(self, receive: Receive) -> None:
        self._task = asyncio.current_task()
        self._is_stopped = False
        self._did_cancel = False
        self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self._is_stopped and self._task is not None:
            self._did_cancel = True
            self._task.cancel()

    def has_cancelled(self) -> bool:
        """True (once) when the cancellation being handled is this watch's: it is then withdrawn."""
        if not self._did_cancel or self._task is None:
            return False
        self._did_cancel = False
        self._task.uncancel()
        return True

    def stop(self) -> None:
        self._is_stopped = True
        self._watcher.cancel()
