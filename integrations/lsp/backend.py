"""A client of the native editor protocol (msgpack-RPC over WebSocket, docs/editor-protocol.md).

    backend = EditorBackend("ws://127.0.0.1:8000/v1/editor")
    result = await backend.complete({"uri": ..., "prefix": ..., "suffix": ...}, on_partial=print)
    # cancelling the awaiting task sends `cancel` for that completion

One connection, opened on first use and reopened after a drop; one reader task routes responses to
their waiting request and `completion/partial` notifications to the callback. Used by the LSP bridge
and bench/editor_latency.py.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, Callable

import msgpack
from websockets.exceptions import ConnectionClosed

from integrations.editor import protocol as rpc


class BackendPaused(Exception):
    """A completion not sent: the backend asked for a pause (`EditorBackend.pause`) that has not ended."""


class BackendError(Exception):
    """An error response from the backend: `code` (docs/editor-protocol.md), message, data."""

    def __init__(self, error: dict):
        super().__init__(f"{error.get('message')} (code {error.get('code')})")
        self.code = error.get("code")
        self.data = error.get("data") or {}


class BackendClosed(ConnectionError):
    """The server closed the connection: `close_code` (RFC 6455) and `reason` from its close frame, None
    and "" when it dropped without one. 1013 ("try again later") is a server draining or holding its most
    editor connections; 1001 ("going away") a drain's end or an idle connection closed
    (docs/editor-protocol.md, "Errors and limits")."""

    def __init__(self, message: str, close_code: int | None, reason: str):
        super().__init__(message)
        self.close_code, self.reason = close_code, reason


# How long closing waits for the server's closing handshake (websockets' default is 10 s): a stalled
# server held the LSP `shutdown` answer that long, past the ~2 s editors give it before killing the bridge
CLOSE_TIMEOUT_S = 1.0


class EditorBackend:
    def __init__(self, url: str, api_key: str | None = None, connect_timeout_s: float = 10.0,
                 answer_timeout_s: float | None = None):
        """answer_timeout_s: the longest any call waits for its answer (None: no bound); past it the call
        raises TimeoutError, a completion is cancelled at the server, and a connection whose `initialize`
        went unanswered is dropped (the next call connects again). A server that keeps the connection
        open and never answers held an LSP request for as long as the socket lived (50 s, helper-125)."""
        self.url = url
        self.connect_timeout_s, self.answer_timeout_s = connect_timeout_s, answer_timeout_s
        self.extra_headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.server_info: dict | None = None
        self._ws = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[Any, asyncio.Future] = {}
        self._frame_bytes: dict[Any, int] = {}  # size of each waiting request's frame
        self._partials: dict[Any, Callable[[str], Any]] = {}
        self._ids = itertools.count(1)
        self._connect_lock = asyncio.Lock()
        self._turns: asyncio.Semaphore | None = None  # the server's max_inflight completions at once
        self.retry_at = 0.0  # time.monotonic() before which no completion is sent, no connection opened (pause)

    async def _connection(self):
        """The open connection, or a new one once its `initialize` has answered. Raises BackendPaused,
        opening none, while a pause lasts: checked under the lock, where the connection is made (a caller
        that waited there while another's connection was refused with 1013 connected again, within the
        pause that refusal started)."""
        async with self._connect_lock:
            if self._ws is None:
                self.raise_if_paused()
                import websockets
                from websockets.exceptions import InvalidStatus

                try:
                    self._ws = await asyncio.wait_for(
                        websockets.connect(self.url, max_size=None, additional_headers=self.extra_headers or None,
                                           close_timeout=CLOSE_TIMEOUT_S),
                        self.connect_timeout_s,
                    )
                except InvalidStatus as exc:
                    status = exc.response.status_code
                    # The server refuses a handshake before accepting it, so every refusal is a 403 here.
                    hint = (": a missing or wrong API key (--api-key), a path other than /v1/editor, or a "
                            "server shutting down" if status in (401, 403) else "")
                    raise ConnectionRefusedError(f"{self.url} refused the WebSocket with HTTP {status}{hint}") from None
                ws = self._ws
                self._reader = asyncio.ensure_future(self._read(ws))
                try:
                    self.server_info = await self._call_on(ws, "initialize", {"client": {"name": "refusion-lsp"}})
                except BaseException:  # unanswered, closed (the reader let it go), or the caller left: not used
                    if self._ws is ws:
                        self._ws = None
                    await asyncio.shield(ws.close())
                    raise
            return self._ws

    async def _read(self, ws) -> None:
        try:
            async for data in ws:
                msg = msgpack.unpackb(data, raw=False)
                if msg[0] == rpc.RESPONSE and msg[1] is None:
                    self._answer_unreadable_frame(msg)
                elif msg[0] == rpc.RESPONSE:
                    future = self._pending.pop(msg[1], None)
                    if future is not None and not future.done():
                        future.set_result(msg)
                elif msg[0] == rpc.NOTIFICATION and msg[1] == "completion/partial":
                    callback = self._partials.get(msg[2].get("id"))
                    if callback is not None:
                        outcome = callback(msg[2].get("text", ""))
                        if asyncio.iscoroutine(outcome):
                            await outcome
        except Exception:  # noqa: BLE001 - connection dropped: fail every waiter, reconnect next call
            pass
        finally:
            if self._ws is ws:
                self._ws = None
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(self._closed_error(ws))
            self._pending.clear()

    def _answer_unreadable_frame(self, response: list) -> None:
        """An error with id nil answers a frame whose id the server could not read, e.g. one over its
        max_frame_bytes (docs/editor-protocol.md, "Errors and limits"; as JSON-RPC 2.0, section 5), which
        gets no other answer. The waiting requests whose frames were over the server's limit fail with
        this error; when none was (the frame is not known), every waiting request fails, rather than one
        of them waiting forever."""
        limit = (self.server_info or {}).get("limits", {}).get("max_frame_bytes")
        oversized = [msg_id for msg_id, size in self._frame_bytes.items()
                     if isinstance(limit, int) and size > limit and msg_id in self._pending]
        for msg_id in oversized or list(self._pending):
            future = self._pending.pop(msg_id)
            if not future.done():
                future.set_result(response)

    def _closed_error(self, ws) -> BackendClosed:
        """Why the connection ended, from its close frame: 1001 ("going away") and 1013 ("try again
        later") are the server draining, or refusing one more connection, or closing an idle one
        (docs/editor-protocol.md), worth saying so."""
        code, reason = getattr(ws, "close_code", None), getattr(ws, "close_reason", None) or ""
        if code in (1001, 1013):
            what = "is shutting down or restarting" if "shutting down" in reason else "closed the editor connection"
            return BackendClosed(f"the refusion server at {self.url} {what} (close code {code}: {reason}); "
                                 "retry in a few seconds", code, reason)
        return BackendClosed(f"editor backend connection to {self.url} closed" + (f" (close code {code})" if code else ""),
                             code, reason)

    async def _call_on(self, ws, method: str, params: dict, msg_id=None):
        msg_id = next(self._ids) if msg_id is None else msg_id
        future = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        try:
            frame = rpc.encode_request(msg_id, method, params)
            self._frame_bytes[msg_id] = len(frame)
            try:
                await ws.send(frame)
            except ConnectionClosed:  # the server closed it (a drain's 1001 or 1013) or it dropped
                if self._ws is ws:  # (before the reader saw the close): the next call connects again
                    self._ws = None
                raise self._closed_error(ws) from None
            try:
                _, _, error, result = await asyncio.wait_for(future, self.answer_timeout_s)
            except asyncio.TimeoutError:
                raise asyncio.TimeoutError(f"no answer to {method} from {self.url} within {self.answer_timeout_s:g} s: "
                                           "the server is stalled or overloaded") from None
        finally:  # answered, or the send failed or the caller was cancelled: nothing waits on it any more
            self._pending.pop(msg_id, None)
            self._frame_bytes.pop(msg_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # the reader may have failed it while the send failed: retrieved, not logged
        if error is not None:
            raise BackendError(error)
        return result

    async def limits(self) -> rpc.Limits:
        """The server's limits, from its `initialize` answer (connecting first when needed: BackendPaused
        within a pause); the protocol's defaults (docs/editor-protocol.md) for any it did not announce."""
        await self._connection()
        announced = (self.server_info or {}).get("limits") or {}
        return rpc.Limits(**{name: value for name, value in announced.items()
                             if name in rpc.Limits.__dataclass_fields__ and isinstance(value, int)})

    async def call(self, method: str, params: dict | None = None) -> Any:
        return await self._call_on(await self._connection(), method, params or {})

    def pause(self, seconds: float) -> float:
        """Send no completion, and open no connection, for `seconds` (a backend's retry_after_s, honoured as
        an HTTP client honours Retry-After); a pause that ends later already stays. Returns the seconds
        left in the pause that holds now: `seconds`, or more where that longer pause stays."""
        now = time.monotonic()
        self.retry_at = max(self.retry_at, now + seconds)
        return max(seconds, self.retry_at - now)  # ((now + seconds) - now can come out a hair short of seconds)

    async def complete(self, params: dict, on_partial: Callable[[str], Any] | None = None) -> dict:
        """Run one completion; cancelling the caller sends `cancel` to the backend. At most the server's
        `max_inflight` run at once (its per-connection limit, docs/editor-protocol.md); more wait here
        for their turn, where the server would refuse them with -32003. Raises BackendPaused, sending
        nothing, while a pause lasts (checked again as each try connects and sends, so one waiting for a
        turn or a connection when a pause starts sends nothing); BackendClosed when the server closes the
        connection under it, after one more try on a new connection for a 1001 ("going away"; BackendPaused
        instead when a pause started meanwhile); BackendError for an error answer."""
        self.raise_if_paused()  # (before waiting for a turn)
        if self._turns is None:
            limit = (await self.limits()).max_inflight  # connects first; later calls skip this
            if self._turns is None:  # checked again after the await: concurrent first calls share one
                self._turns = asyncio.Semaphore(limit)
        async with self._turns:
            try:
                return await self._complete(params, on_partial)
            except BackendClosed as exc:
                if exc.close_code != 1001:
                    raise
            # "Going away" with this completion unanswered: it raced the close (a drain closes once the
            # completions it took have answered; an idle close, with none in flight, cancels one that came in
            # as it closed). Sent once more on a new connection, where a draining server refuses it with 1013;
            # not within a pause (a draining server answers OVERLOADED before it closes): _complete checks
            return await self._complete(params, on_partial)

    def raise_if_paused(self) -> None:
        """Raises BackendPaused while a pause lasts (see `pause`)."""
        if time.monotonic() < self.retry_at:
            raise BackendPaused(f"paused for {self.retry_at - time.monotonic():.1f} s more")

    async def _complete(self, params: dict, on_partial: Callable[[str], Any] | None) -> dict:
        ws = await self._connection()  # (BackendPaused where it would connect within a pause)
        self.raise_if_paused()  # (on an open connection too: nothing awaits from here to the send)
        msg_id = next(self._ids)
        if on_partial is not None:
            self._partials[msg_id] = on_partial
        try:
            return await self._call_on(ws, "complete", params, msg_id)
        except (asyncio.CancelledError, asyncio.TimeoutError):  # the caller left, or no answer in time
            if self._ws is ws:
                await asyncio.shield(self._send_cancel(ws, msg_id))
            raise
        finally:
            self._partials.pop(msg_id, None)

    async def _send_cancel(self, ws, msg_id) -> None:
        try:
            await ws.send(rpc.encode_request(next(self._ids), "cancel", {"id": msg_id}))
        except Exception:  # noqa: BLE001 - a dead connection has nothing left to cancel
            pass

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
