"""A small HTTP client for the latency service (standard library only: agents stay light).

Errors come in two kinds: `Unreachable` (no connection, a timeout, a 5xx or 429: worth trying
again later) and `ServiceError` (a 4xx: the request itself is wrong, retrying will not help).
"""

from __future__ import annotations

import http.client
import json
import random
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search_spaces import UserError


class ServiceError(UserError):
    """The service refused the request (4xx): the message says why."""

    def __init__(self, status: int, detail: str, method: str, path: str):
        self.status, self.detail = status, detail
        super().__init__(f"{method} {path}: the service answered {status}: {detail}")


class Unreachable(Exception):
    """No usable answer (connection refused or cut, timeout, 5xx, 429): try again later."""


class CertificateError(UserError):
    """The service's TLS certificate could not be verified: retrying will not help."""


class Client:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 30.0,
        ca: str | Path | None = None,
    ):
        """`ca`: a PEM file of the certificate(s) to trust for an https:// service (its own
        self-signed certificate, or a private CA); default: the system's trusted CAs."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UserError(f"server URL must look like http://HOST:PORT, not {url!r}")
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        # a proxy from the environment must not capture a server on this machine
        local = parts.hostname in ("127.0.0.1", "::1", "localhost")
        handlers: list[urllib.request.BaseHandler] = []
        if local:
            handlers.append(urllib.request.ProxyHandler({}))
        if ca is not None:
            if parts.scheme != "https":
                raise UserError(f"--ca is for an https:// service; {url!r} is plain http")
            handlers.append(urllib.request.HTTPSHandler(context=_trusting(Path(ca))))
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
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise CertificateError(
                    f"{self.url}: certificate verification failed ({reason.verify_message}); "
                    "if the service's certificate is self-signed or from a private CA, pass it "
                    "(PEM) with --ca FILE"
                ) from None
            raise Unreachable(f"{self.url} is unreachable ({reason})") from None
        if kind == "application/json":
            return json.loads(raw) if raw else None
        return raw.decode()


def _trusting(ca: Path) -> ssl.SSLContext:
    """A client TLS context that trusts the certificates in the PEM file `ca`."""
    if not ca.is_file():
        raise UserError(f"--ca {str(ca)!r}: no such file (give the service's certificate, PEM)")
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (ssl.SSLError, ValueError) as e:
        raise UserError(f"--ca {str(ca)!r}: not a PEM certificate file ({e})") from None


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
