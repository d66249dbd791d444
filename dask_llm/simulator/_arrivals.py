"""When a request arrived: when its bytes reached the server's kernel, not its handler.

A provider stamps a request when it reaches its front end, and its rate
windows count those stamps. The simulator's handlers run one after another
on one event loop that shares the machine with the client it measures, so a
handler may start long after its request arrived: stamped by the handler, a
client that wrote 200 requests together had them stamped over the 0.2-0.4 s
the loop took to run their handlers (1-2 ms each), and the loop, short of
CPU, stalled for up to 1.3 s at a time (nice -10, two cores shared with the
job and other work). Requests sent over such a stall were stamped together
at its end, and the window ending there counted more than the client had
sent in any second (2026-12-07, 500 requests/s: 1 ms median from the
client's write to the handler's stamp, p99 70-250 ms, max 1.2 s; peaks up to
575 of 500 against a client whose every 1.01 s held 500).

So a request is stamped when its bytes reached the kernel: on Linux, when
the loop comes round to read them (``data_received``), ``TCP_INFO``'s
``tcpi_last_data_recv`` says how long ago the connection last received
data, in whole jiffies (4 ms here, 1-10 ms by kernel), so the stamp is within
a jiffy of the arrival, early or late, however late the loop reads it: a
client's burst is counted in the second it was sent. (The stamp plus a jiffy,
never early, was tried: stamps then came up to 14 ms late, past the 10 ms by
which the client's window outlasts the provider's second, and a few
requests a run were counted in the next second.) Elsewhere, the read.

Stamps reach the limiters and the peaks out of order: the loop reads a new
connection a turn after it accepts it, so its request may be handled after
one that came in later on an open connection. Each is counted at its own
time (``SlidingWindow`` and ``Stats.started`` place it among the others).
Moved up to the latest stamp seen instead, as the limiters had done for late
arrivals, nine requests on new connections were counted 0.11-0.15 s after
they arrived, in the next second (one run of six, 2026-12-07). HTTP/1.1
without pipelining (what the SDKs send): a connection carries one request at
a time, so its first data after a request was taken is the next request's.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

#: ``struct tcp_info``'s ``tcpi_last_data_recv`` (milliseconds, a __u32 after eight
#: bytes and eleven __u32s), Linux only.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_LAST_DATA_RECV = 52
_ARRIVED = web.RequestKey("dask_llm.simulator.arrived", float)


def received_at(sock: Any, now: float) -> float:
    """When ``sock`` last received data, to a jiffy (``now`` if the kernel cannot say)."""
    if _TCP_INFO is None or sock is None:
        return now
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _LAST_DATA_RECV + 4)
    except OSError:
        return now
    if len(info) < _LAST_DATA_RECV + 4:
        return now
    (ago_ms,) = struct.unpack_from("I", info, _LAST_DATA_RECV)
    return now - ago_ms / 1000.0


class Arrivals:
    """The arrival stamps of the requests on the server's connections (its loop only)."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: dict[Any, float] = {}  # transport -> its next request's arrival

    def data(self, transport: Any, sock: Any) -> None:
        """Bytes came in on ``transport``: the first since its last request began a new one."""
        if transport not in self._pending:
            self._pending[transport] = received_at(sock, time.monotonic())

    def closed(self, transport: Any) -> None:
        self._pending.pop(transport, None)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Give every request its stamp (``of``); what comes in while it runs is its own."""
        stamp = self._pending.pop(request.transport, None)
        if stamp is not None:
            request[_ARRIVED] = stamp
        try:
            return await handler(request)
        finally:
            # The next request on this connection comes after this one's response, which
            # is written once the handler has returned: bytes stamped now are the later
            # chunks of this one's body (a streamed answer's last bytes may have gone out
            # already: its next request is then stamped by its handler, later).
            self._pending.pop(request.transport, None)

    def of(self, request: web.BaseRequest) -> float:
        """When ``request`` arrived (earlier than requests handled before it, at times).

        A request that did not come through ``ArrivalSite`` (a test server) arrived now.
        """
        stamp = request.get(_ARRIVED)
        return time.monotonic() if stamp is None else stamp


class _Stamping(asyncio.Protocol):
    """aiohttp's protocol of one connection, with its data stamped on the way in."""

    __slots__ = ("arrivals", "inner", "sock", "transport")

    def __init__(self, inner: Any, arrivals: Arrivals) -> None:
        self.inner = inner
        self.arrivals = arrivals
        self.transport: Any = None
        self.sock: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.sock = transport.get_extra_info("socket")
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.arrivals.data(self.transport, self.sock)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self.inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self.arrivals.closed(self.transport)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class ArrivalSite(web.BaseSite):
    """A TCP site whose connections stamp their requests' arrival into ``arrivals``."""

    __slots__ = ("_arrivals", "_host", "_port", "port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        arrivals: Arrivals,
        *,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._arrivals = arrivals
        self.port = port  # the bound port once started

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        arrivals = self._arrivals
        factory: Callable[[], asyncio.Protocol] = lambda: _Stamping(server(), arrivals)  # noqa: E731
        loop = asyncio.get_running_loop()
        listening = await loop.create_server(factory, self._host, self._port, backlog=self._backlog)
        self._server = listening
        self.port = int(listening.sockets[0].getsockname()[1])
