"""Who calls the latency service, decided before any body is read.

`Gate` (ASGI middleware) authenticates every request from its bearer token (401 for a bad or
missing one), caps the body (413) and refuses bodies that are not UTF-8 (422); the route
dependencies `Caller`, `Admin` and `Agent` then say what the caller may do (403).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .api_docs import DOCS_ASSETS
from .registry import Principal

# needing no token: liveness and the API's own description
PUBLIC_PATHS = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect"}


class Gate:
    """ASGI middleware: who is calling (401 for a bad or missing token), and a body cap (413).

    Runs before routing, so a stranger's body is never read, and a too large body is refused
    from its Content-Length or, when streamed, as soon as it passes the cap."""

    def __init__(self, app, identify: Callable[[str], Principal | None], public_read: bool, cap):
        self.app, self.identify, self.public_read, self.cap = app, identify, public_read, cap

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path, method = scope["path"], scope["method"]
        principal = None
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return await _reply(send, 401, "the Authorization header must be 'Bearer TOKEN'")
            principal = self.identify(token.strip())
            if principal is None:
                return await _reply(send, 401, "unknown or revoked token")
        elif not _is_public(path) and not (self.public_read and _is_read(method, path)):
            return await _reply(
                send, 401, "this needs a token: send the header 'Authorization: Bearer TOKEN'"
            )
        scope["diffnas.principal"] = principal

        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.cap):
            return await _reply(send, 413, f"request body over the {self.cap}-byte cap")
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.cap:
                return await _reply(send, 413, f"request body over the {self.cap}-byte cap")
        # Bodies are JSON, which travels as UTF-8 (RFC 8259, 8.1). Checked here because the
        # framework's own parser reports other encodings as a generic 400, not as malformed.
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            invalid = [{"loc": ["body", e.start], "msg": "not UTF-8 text", "type": "json_invalid"}]
            return await _reply(send, 422, invalid)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(DOCS_ASSETS + "/")


def _is_read(method: str, path: str) -> bool:
    return method in ("GET", "HEAD") or (method == "POST" and path == "/predict")


async def _reply(send, status: int, detail: str | list[dict]) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_bearer = HTTPBearer(auto_error=False)  # only to show the scheme in the OpenAPI schema


def caller(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal | None:
    return request.scope.get("diffnas.principal")


Caller = Annotated[Principal | None, Depends(caller)]


def admin(p: Caller) -> Principal:
    if p is None or p.role != "admin":
        raise HTTPException(403, "this needs the admin token")
    return p


def agent(p: Caller) -> Principal:
    if p is None or p.role not in ("admin", "agent"):
        raise HTTPException(403, "this needs an agent token (or the admin token)")
    return p


Admin = Annotated[Principal, Depends(admin)]
Agent = Annotated[Principal, Depends(agent)]
