"""WebSocket handshakes must come from this site's own origin (scheme, host and port).

Channels' `AllowedHostsOriginValidator` compares only the Origin's host with ALLOWED_HOSTS, so
`Origin: http://127.0.0.1:1` (any port, either scheme: another site on the same host) was
accepted. As Django's CSRF check does for unsafe requests, the Origin must equal the
origin the socket was opened on (`ws` ↔ `http`, `wss` ↔ `https`, the Host header with its
port) or be listed in CSRF_TRUSTED_ORIGINS; the Host must be allowed too.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(scheme: str, netloc: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None
    if not parts.hostname or port is None:
        return None
    return scheme, parts.hostname.lower(), port


def _is_secure(scope: dict[str, Any], headers: dict[bytes, bytes]) -> bool:
    if scope.get("scheme") in ("wss", "https"):
        return True
    proxy = settings.SECURE_PROXY_SSL_HEADER
    if proxy:  # e.g. ("HTTP_X_FORWARDED_PROTO", "https") behind a TLS-terminating proxy
        name = proxy[0].removeprefix("HTTP_").replace("_", "-").lower().encode()
        return headers.get(name, b"").decode("latin-1").split(",")[0].strip() == proxy[1]
    return False


def origin_allowed(scope: dict[str, Any]) -> bool:
    headers = {name.lower(): value for name, value in scope.get("headers", [])}
    origin, host = headers.get(b"origin", b"").decode("latin-1"), headers.get(b"host", b"").decode("latin-1")
    if not origin or not host or not validate_host(split_domain_port(host)[0], settings.ALLOWED_HOSTS):
        return False
    parts = urlsplit(origin)
    seen = _origin(parts.scheme, parts.netloc)
    if seen is None:
        return False
    own = _origin("https" if _is_secure(scope, headers) else "http", host)
    trusted = {_origin(urlsplit(o).scheme, urlsplit(o).netloc) for o in settings.CSRF_TRUSTED_ORIGINS}
    return seen == own or seen in trusted


class SameOriginValidator:
    """ASGI middleware: refuse (close the handshake) WebSockets whose Origin is not this site's."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] == "websocket" and not origin_allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.app(scope, receive, send)
