"""WebSocket metrics of the gateway, registered once in the kernel's registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from aiwfe.kernel.metrics import REGISTRY

__all__ = ["WS_CLOSED", "WS_CONNECTIONS", "WS_CONNECT_FAILURES", "WS_CONNECT_SECONDS"]

WS_CONNECTIONS = Gauge("aiwfe_ws_connections", "Open WebSocket connections on this gateway", registry=REGISTRY)
WS_CONNECT_FAILURES = Counter(
    "aiwfe_ws_connect_failures_total",
    "WebSocket handshakes refused, by reason (no_token, invalid_token, revoked, origin, overloaded, unavailable)",
    ["reason"],
    registry=REGISTRY,
)
WS_CONNECT_SECONDS = Histogram(
    "aiwfe_ws_connect_seconds",
    "Time from the WebSocket handshake request to accept (token verification included)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
WS_CLOSED = Counter(
    "aiwfe_ws_server_closes_total",
    "WebSockets closed by the gateway, by close code "
    "(1000 idle, 1008 rate limit, 1009 frame too big, 1013 slow reader, 4001 token revoked or expired)",
    ["code"],
    registry=REGISTRY,
)
