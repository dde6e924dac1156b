"""The gateway's settings (``[plugins.gateway]`` in a manifest).

Importing this module loads msgspec only, so the narrow interface of
:mod:`aiwfe.plugins.gateway.services` can name the type without importing the plugin.
"""

from __future__ import annotations

import msgspec

__all__ = ["SERVERS", "GatewayConfig"]

#: The values ``server`` accepts (see :mod:`aiwfe.plugins.gateway.server`).
SERVERS = ("uvicorn", "granian")


class GatewayConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Gateway settings (``[plugins.gateway]`` in a manifest).

    ``host``/``port``: where to listen (port 0 = any free port; ``public_url`` tells).
    ``server``: ``uvicorn`` (default) or ``granian`` (install extra ``aiwfe[granian]``; see
    plugins/gateway/server.py for what differs).
    ``public_host``: host name used in ``public_url`` (default: ``host``, or 127.0.0.1 for 0.0.0.0).
    ``allowed_origins``: browser Origins allowed to open WebSockets (``"*"`` = any);
    the gateway's own origin is always allowed; clients that send no Origin are not browsers.
    ``max_frame_bytes``: largest WebSocket frame a client may send (close 1009 beyond).
    ``max_body_bytes``: largest HTTP request body (413 beyond, nothing recorded); job input
    must also fit the bus's limit (NATS ``max_payload``, 1 MiB by default), else 413 too.
    ``rate_per_s``/``rate_burst``: per-connection token bucket for client frames;
    ``rate_strikes``: consecutive over-limit frames answered with ``error`` before close 1008.
    ``ping_interval_s``/``ping_timeout_s``: protocol-level keepalive (0 = off).
    ``idle_timeout_s``: close a socket that sent nothing for this long (1000).
    ``send_queue_size``: frames queued per socket, ``send_queue_bytes``: their characters
    (an empty queue takes any one frame); ``slow_reader_timeout_s``: how long job events wait
    for space in a full queue before the slow reader is closed (1013).
    ``job_kinds``: job kind (HTTP/WS) → job contract address, e.g. ``{"helios": "helios.ask"}``.
    ``ws_calls``: request contract addresses a WebSocket ``call`` frame may use (each
    must be one of the gateway's declared ``calls``).
    ``verify_timeout_s``/``call_timeout_s``: deadlines of token checks and ``call`` frames.
    ``retry_after_s``: the hint sent with 503 and retryable error frames when the error
    carries none of its own (the auth plugin's hashing gate sends its estimate).
    ``backlog``: listen backlog (bursts of connects queue here).
    ``reuse_port``: bind with ``SO_REUSEPORT`` so that several gateway processes on one
    host share the port and the kernel spreads connections over them (Linux; replicas
    behind a Service need it not).
    ``max_header_bytes``: largest request headers (HTTP and WebSocket handshake) in bytes;
    431 at once beyond. ``max_frame_depth``: deepest nesting of arrays/objects in a client
    frame; deeper frames get ``bad_frame`` (the socket stays open).
    ``keep_alive_s``: idle HTTP keep-alive before the server closes a connection; longer
    than clients' pools keep idle connections, so a reused one is not closed under a request.
    ``max_sockets_per_user``: WebSockets and event streams one user may hold open at once on
    this gateway process (handshakes under way count); past it the handshake or the stream is
    answered 429 with ``Retry-After``, so one token holder cannot take every socket the process can open.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    server: str = "uvicorn"
    public_host: str = ""
    allowed_origins: list[str] = []
    max_frame_bytes: int = 65_536
    max_body_bytes: int = 1_048_576
    rate_per_s: float = 20.0
    rate_burst: int = 40
    rate_strikes: int = 10
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    idle_timeout_s: float = 300.0
    send_queue_size: int = 256
    send_queue_bytes: int = 4 * 1024 * 1024
    slow_reader_timeout_s: float = 5.0
    job_kinds: dict[str, str] = {}
    ws_calls: list[str] = msgspec.field(default_factory=lambda: ["perception.perceive"])
    verify_timeout_s: float = 5.0
    call_timeout_s: float = 10.0
    retry_after_s: float = 1.0
    backlog: int = 4096
    keep_alive_s: float = 75.0
    reuse_port: bool = False
    max_header_bytes: int = 16_384
    max_frame_depth: int = 32
    max_sockets_per_user: int = 256
