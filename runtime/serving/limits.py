"""How much of its time, memory and sockets one replica gives a client: request heads and bodies bounded in
time, bodies in size, and open connections in number. The defaults are named here once: `serve`'s flags and
ServerConfig both take them from here (a light module, so the CLI can read them without loading torch)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Limits:
    # Far above any prompt a context window holds (128k tokens of text is about 0.5 MB), far below what hurts:
    # a body is held whole in memory and parsed before anything else can refuse it.
    max_body_bytes: int = 4 * 1024 * 1024
    # A request's head, from its first byte (or the connection's opening): a client that trickles it holds a
    # connection without ever being a request the server could refuse.
    header_timeout_s: float = 10.0
    # A whole body, from the end of its head (not between reads: a byte a second would reset such a timer
    # forever); 30 s lets a 4 MiB body through at 1.2 Mbit/s.
    body_timeout_s: float = 30.0
    # Open at once (kept-alive ones too); each holds a socket and a file descriptor, and slow clients hold them
    # for up to the timeouts above. A request on a connection beyond the cap gets 503 and the connection closes.
    max_connections: int = 256

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"{f.name}: must be positive, not {value!r}")
