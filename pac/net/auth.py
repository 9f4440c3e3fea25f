"""Join tokens: a peer proves it knows the run's token, and the coordinator proves it back.

Neither side ever sends the token. Each side sends a fresh random nonce; the other answers with
HMAC-SHA256(token, role | nonce). The role in the MAC keeps a proof from being replayed in the
other direction. This authenticates, it does not encrypt: see the security notes in the README.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from pac.errors import PacError

TOKEN_ENV = "PAC_JOIN_TOKEN"
NONCE_BYTES = 16


def new_token() -> str:
    return secrets.token_hex(16)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(token: str, role: str, nonce: bytes) -> bytes:
    return hmac.new(token.encode(), role.encode() + b"|" + nonce, hashlib.sha256).digest()


def verify(token: str, role: str, nonce: bytes, claimed: bytes) -> bool:
    return hmac.compare_digest(proof(token, role, nonce), claimed)


def token_from_env(given: str | None = None) -> str:
    """The join token given on the command line, else from $PAC_JOIN_TOKEN; an empty one is refused."""
    token = given if given is not None else os.environ.get(TOKEN_ENV, "")
    if not token:
        raise PacError(
            f"no join token: set {TOKEN_ENV} to the token `pac-launch` printed (the same on every device), "
            f'e.g. export {TOKEN_ENV}=$(python -c "import secrets; print(secrets.token_hex(16))")'
        )
    return token
