"""A small HTTP client for the latency service (standard library only: agents stay light).

Errors come in two kinds: `Unreachable` (no connection, a timeout, a 5xx or 429: worth trying
again later) and `ServiceError` (a 4xx: the request itself is wrong, retrying will not help).
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from search_spaces import UserError


class ServiceError(UserError):
    """The service refused the request (4xx): the message says why."""

    def __init__(self, status: int, detail: str, method: str, path: str):
        self.status, self.detail = status, detail
        super().__init__(f"{method} {path}: the service answered {status}: {detail}")


class Unreachable(Exception):
    """No usable answer (connection refused or cut, timeout, 5xx, 429): try again later."""


class Client:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UserError(f"server URL must look like http://HOST:PORT, not {url!r}")
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        # a proxy from the environment must not capture a server on this machine
        local = parts.hostname in ("127.0.0.1", "::1", "localhost")
        handlers = [urllib.request.ProxyHandler({})] if local else []
        self._opener = urllib.request.build_opener(*handlers)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded JSON answer (text for other content types)."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body, allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout) as r:
                raw, kind = r.read(), r.headers.get_content_type()
        except urllib.error.HTTPError as e:
            detail = _detail(e.read())
            if e.code >= 500 or e.code == 429:
                raise Unreachable(f"{self.url} answered {e.code}: {detail}") from None
            raise ServiceError(e.code, detail, method, path) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise Unreachable(f"{self.url} is unreachable ({reason})") from None
        if kind == "application/json":
            return json.loads(raw) if raw else None
        return raw.decode()


def _detail(raw: bytes) -> str:
    try:
        detail = json.loads(raw).get("detail", raw.decode())
    except (ValueError, AttributeError, UnicodeDecodeError):
        return raw[:500].decode(errors="replace")
    return detail if isinstance(detail, str) else json.dumps(detail)


@dataclass
class Backoff:
    """Exponential backoff with jitter, so that agents cut off together do not return together."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0

    def delays(self):
        delay = self.initial
        while True:
            yield delay * random.uniform(0.8, 1.2)
            delay = min(delay * self.factor, self.maximum)


class Stopped(Exception):
    """The caller asked to stop while waiting to retry."""


def retrying(
    call: Callable[[], Any],
    stop: threading.Event,
    backoff: Backoff,
    say: Callable[[str], None],
    give_up_after: float | None = None,
) -> Any:
    """`call()` until it gets an answer, waiting between tries while the service is away.

    A 4xx (ServiceError) is not retried. Raises Stopped if `stop` is set while waiting, and
    UserError once `give_up_after` seconds of waiting have passed."""
    waited = 0.0
    for delay in backoff.delays():
        try:
            return call()
        except Unreachable as e:
            if give_up_after is not None and waited >= give_up_after:
                raise UserError(f"{e}; gave up after {waited:.0f} s of retries") from None
            say(f"{e}; retrying in {delay:.1f} s")
            if stop.wait(delay):
                raise Stopped from None
            waited += delay
