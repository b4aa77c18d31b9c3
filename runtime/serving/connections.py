"""uvicorn's h11 connection, with what uvicorn leaves out: a timeout for a request's head, and a cap on open
connections (the oldest idle one makes room; only when all are busy is a new one refused, in OpenAI's format); and the
server that runs an app on it (a replica's or the gateway's), saying when it is told to stop.

uvicorn times out only an idle kept-alive connection: one that opens and sends nothing, or sends its head a
byte at a time, is held for ever. Here the head must be whole within the header timeout, counted from the
connection's opening or from the first byte of the next request on a kept-alive one. (uvicorn's own
`limit_concurrency` also caps connections, but answers a bare text 503 and counts running requests too.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import h11
import uvicorn
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from ember.runtime.serving.errors import APIError
from ember.runtime.serving.limits import Limits

log = logging.getLogger("ember.server")


def _refusal(max_connections: int):
    error = APIError(503, f"this replica has its limit of {max_connections} open connections; retry shortly",
                     type="service_unavailable", code="too_many_connections")
    return JSONResponse(error.body(), status_code=503, headers={"Retry-After": "1", "Connection": "close"})


def connection_protocol(limits: Limits, counted: Callable[[int], None] = lambda _: None) -> type[H11Protocol]:
    """The protocol class to give uvicorn (`http=`): the limits are the class's, as uvicorn makes one per connection.
    `counted` hears the number of open connections as it changes (a gauge)."""

    class Connection(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            counted(len(self.connections))
            self._head_timer = None
            self._opened = self.loop.time()
            # At the cap, the oldest connection with no request in flight (one still awaiting its head, or idle
            # between requests) makes room: otherwise a few sockets that send nothing, or only ask /health now
            # and then, would lock every client out. Only when every connection is running a request is the new
            # one refused.
            if len(self.connections) > limits.max_connections and not self._evict_idle():  # this one counts
                log.warning("a connection beyond the cap of %d is refused", limits.max_connections)
                self.app = _refusal(limits.max_connections)  # each request on it gets 503, then it closes
            self._await_head()

        def _evict_idle(self) -> bool:
            idle = [c for c in self.connections if c is not self and isinstance(c, Connection) and c._idle()]
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c._opened)
            oldest._stop_waiting()
            oldest.transport.close()
            return True

        def _idle(self) -> bool:
            """No request of this connection's is being read or answered."""
            return (self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
                    and not self.transport.is_closing())

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and self.conn.their_state is h11.IDLE:
                self._await_head()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is whole (or the connection is done)
                self._stop_waiting()

        def connection_lost(self, exc) -> None:
            self._stop_waiting()
            super().connection_lost(exc)
            counted(len(self.connections))

        def _await_head(self) -> None:
            self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_too_slow)

        def _stop_waiting(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                log.warning("closed a connection whose request head did not arrive within %g s",
                            limits.header_timeout_s)
                self.transport.close()

    return Connection


def run_server(app, host: str, port: int, limits: Limits, on_stop: Callable[[], None] = lambda: None,
               counted: Callable[[int], None] = lambda _: None) -> None:
    """uvicorn with the connection above. `on_stop` runs when the server is told to stop (SIGTERM, SIGINT), before it
    stops listening and finishes what it runs: a replica tells the gateway it drains."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                on_stop()
            super().handle_exit(sig, frame)

    protocol = connection_protocol(limits, counted)
    Server(uvicorn.Config(app, host=host, port=port, log_level="info", http=protocol)).run()
