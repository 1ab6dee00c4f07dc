"""The guard in front of every request: Host and Origin checks, the access token, body size limits.

- Host: only loopback names (127.0.0.1, localhost, [::1], any port) and the configured names, so that a
  page on another site cannot reach the server through DNS rebinding (its requests carry its own name).
- Origin: a request that carries an Origin header must come from the server's own origin (or a
  configured one): cross-site forms and fetches fail even before the token is checked.
- Token: `Authorization: Bearer TOKEN` (for GET also `?token=TOKEN`, which <img src> needs), compared in
  constant time; required for every request from a non-loopback client and for every write from any
  client. The page and its static assets load without it (they hold no data).
- Size: a request body is counted while it streams in and refused as soon as it passes its limit, with or
  without a Content-Length; JSON bodies have much smaller limits than uploads.

Pure ASGI (not BaseHTTPMiddleware) so that the body limit applies to the stream the routes read.
"""
from __future__ import annotations

import ipaddress
import json
import secrets
from typing import Callable, Iterable, List, Optional
from urllib.parse import parse_qs

from starlette.exceptions import HTTPException

LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
PUBLIC_PATHS = ("/static/",)  # the page's JS / CSS / WASM: no data in them
PUBLIC_EXACT = {"/", "/favicon.ico"}


def host_name(host_header: str) -> str:
    """The name part of a Host header ('[::1]:8000' -> '::1', 'Example.org:80' -> 'example.org')."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback_address(address: Optional[str]) -> bool:
    if not address:
        return False
    if address.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def token_matches(given: Optional[str], expected: str) -> bool:
    if not given:
        return False
    return secrets.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


class Guard:
    """ASGI middleware: see the module docstring. `body_limit(method, path, content_type)` gives the limit."""

    def __init__(self, app, token: str, allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = (),
                 body_limit: Optional[Callable[[str, str, str], int]] = None) -> None:
        self.app = app
        self.token = token
        self.hosts = LOOPBACK_NAMES | {host_name(h) for h in allowed_hosts}
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}
        self.body_limit = body_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method, path = scope["method"].upper(), scope["path"]
        refusal = self._refusal(scope, headers, method, path)
        if refusal is not None:
            status, message, extra = refusal
            return await _send_error(send, status, message, extra)
        if self.body_limit is None or method in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.body_limit(method, path, headers.get("content-type", ""))
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_error(send, 400, "invalid Content-Length")
            if int(length) > limit:
                return await _send_error(send, 413, f"request body of {length} bytes exceeds the limit of {limit}")
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Raised inside the route's body parsing: FastAPI answers it as a 413 at once.
                    raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return message

        return await self.app(scope, counted_receive, send)

    def _refusal(self, scope, headers, method: str, path: str):
        host = headers.get("host")
        if not host:
            return 421, "missing Host header", {}
        name = host_name(host)
        if name not in self.hosts:
            return 421, f"unknown Host {name!r}: start the server with --allowed-host {name} to allow it", {}
        origin = headers.get("origin")
        if origin is not None:
            scheme = scope.get("scheme", "http")
            own = f"{scheme}://{host}".lower()
            if origin.rstrip("/").lower() not in self.origins | {own}:
                return 403, f"cross-origin request from {origin[:100]!r} refused", {}
        if path in PUBLIC_EXACT or path.startswith(PUBLIC_PATHS):
            return None
        client = scope.get("client")
        needs_token = method in WRITE_METHODS or not is_loopback_address(client[0] if client else None)
        if not needs_token:
            return None
        given = None
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        elif method in ("GET", "HEAD"):
            values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
            given = values[-1] if values else None
        if given is None:
            return 401, "an access token is needed: send 'Authorization: Bearer TOKEN' (the token is in the URL " \
                        "that segany serve printed)", {"www-authenticate": "Bearer"}
        if not token_matches(given, self.token):
            return 401, "wrong access token", {"www-authenticate": "Bearer"}
        return None


async def _send_error(send, status: int, message: str, extra: Optional[dict] = None) -> None:
    body = json.dumps({"detail": message}).encode()
    headers: List = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
