"""Bearer tokens of the latency service: how they are made, stored and where the admin's lives.

Issued tokens (agents, readers) are kept only as hashes in the database. The admin token
never enters the database: it comes from an environment variable or from a file readable by
its owner alone, and is generated (and printed once) when neither exists.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from search_spaces import UserError

ADMIN_ENV = "DIFFNAS_ADMIN_TOKEN"
AGENT_ENV = "DIFFNAS_TOKEN"
MIN_LENGTH = 16


def new_token() -> str:
    return "dnl_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # Tokens are 256-bit random strings, so a fast hash is enough: there is nothing to
    # brute-force, and every request can be checked without a slow KDF.
    return hashlib.sha256(token.encode()).hexdigest()


def default_admin_file(db: Path) -> Path:
    return db.with_name(db.name + ".admin-token")


def read_token_file(path: Path) -> str:
    """A token from a file that only its owner can read (as ssh does with its keys)."""
    if not path.is_file():
        raise UserError(f"token file {path} does not exist")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise UserError(
            f"token file {path} is readable by other users (mode {mode:o}); "
            f"make it private with `chmod 600 {path}`"
        )
    token = path.read_text().strip()
    if len(token) < MIN_LENGTH:
        raise UserError(f"token file {path} holds no token (at least {MIN_LENGTH} characters)")
    return token


def admin_token(path: Path, announce: Callable[[str], None]) -> str:
    """The admin token: $DIFFNAS_ADMIN_TOKEN, else the 0600 file `path`, else a new token
    written to `path` (mode 0600) and passed to `announce` (printed once)."""
    env = os.environ.get(ADMIN_ENV)
    if env is not None:
        if len(env.strip()) < MIN_LENGTH:
            raise UserError(f"${ADMIN_ENV} is set but shorter than {MIN_LENGTH} characters")
        return env.strip()
    if path.exists():
        return read_token_file(path)
    token = new_token()
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: two servers starting together cannot both think they made the token
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    announce(f"created the admin token (shown this once; stored in {path}, mode 0600):\n  {token}")
    return token
