"""Stop work for a client that has gone: cancel the request's task when it leaves or stops reading.

The ASGI server reports a closed client connection as an `http.disconnect` message from `receive`
(once the request body has been read, the next message is that, or nothing until the response is done).
One watcher task per request waits for it and cancels the request's own task, which cancels whatever
it awaits — an upstream request, a stream relay — and so closes those connections too. A client that
keeps its connection but stops reading is disconnected by the HTTP server once its writes have waited
`client_write_timeout_s` (`eldr.proxy.server`), which this watcher then sees like any disconnect.
"""

from __future__ import annotations

import asyncio

from starlette.types import Receive


class _TaskCancel:
    """Cancels the current task, and recognises that cancellation when the task handles it."""

    def __init__(self) -> None:
        self._task = asyncio.current_task()
        self._did_cancel = False

    def _cancel_task(self) -> None:
        if self._task is not None:
            self._did_cancel = True
            self._task.cancel()

    def has_cancelled(self) -> bool:
        """True (once) when the cancellation being handled is this watcher's: it is then withdrawn."""
        if not self._did_cancel or self._task is None:
            return False
        self._did_cancel = False
        self._task.uncancel()
        return True


class DisconnectWatch(_TaskCancel):
    """Cancels the current task when the client disconnects (one watcher task per request)."""

    def __init__(self, receive: Receive) -> None:
        super().__init__()
        self._is_stopped = False
        self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self._is_stopped:
            self._cancel_task()

    def stop(self) -> None:
        self._is_stopped = True
        self._watcher.cancel()
