"""A gateway process's own options (its settings, such as rate limits, are the Gateway's, in the store). A light module:
`ember gateway`'s flags read their defaults here without loading the server."""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.runtime.serving.limits import Limits


@dataclass(frozen=True)
class GatewayConfig:
    store_url: str
    gateway: str | None = None  # accounts/<a>/gateways/<id>: its settings; None: the store's one gateway's, if any
    limits: Limits = field(default_factory=Limits)  # what one client may take of this process, as a replica's
    refresh_interval_s: float = 1.0
    # /health fails once the last good read of the store is this old (a snapshot still routes until then)
    stale_after_s: float = 60.0
    connect_timeout_s: float = 5.0
    # the longest a replica may take to answer, or between two chunks of a stream (a long queue included)
    upstream_timeout_s: float = 600.0
    # the local cluster's state directory, when the gateway runs beside its replicas: it then scales them
    state_dir: str | None = None
    # a request for a deployment scaled to zero waits this long for a replica to start, among at most this many (well
    # below the connection cap: one sleeping deployment's callers leave room for every other's)
    cold_start_timeout_s: float = 180.0
    max_held_requests: int = 64
