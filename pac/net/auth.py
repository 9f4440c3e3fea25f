"""Join tokens: they encrypt the control plane, and each side proves it knows the run's token.

Encryption: every peer's control socket is a CURVE server whose key pair is derived from the token
(SHA-256 of it, as the secret key). Only someone who knows the token can compute the server's public
key, which a CURVE client needs to complete the handshake, so a coordinator without the token cannot
even connect, and nobody on the network can read the control traffic (which carries the token ids
of the training data). A handshake that fails is how a wrong token shows up on the wire.

Proofs, on top: each side sends a fresh random nonce; the other answers with HMAC-SHA256(token,
role | nonce). The role in the MAC keeps a proof from being replayed in the other direction.
Neither side ever sends the token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

import zmq
from zmq.utils import z85

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


def control_keys(token: str) -> tuple[bytes, bytes]:
    """The (public, secret) CURVE key pair of every peer's control socket in a run with this token."""
    secret = z85.encode(hashlib.sha256(b"pac-control-v1|" + token.encode()).digest())
    return zmq.curve_public(secret), secret


def serve_encrypted(sock: zmq.Socket, token: str) -> None:
    """Make `sock` (a peer's control socket, before bind) a CURVE server keyed by the token."""
    public, secret = control_keys(token)
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = public, secret


def connect_encrypted(sock: zmq.Socket, token: str) -> None:
    """Make `sock` (before connect) a CURVE client of peers keyed by the token; its own keys are random."""
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.curve_serverkey = control_keys(token)[0]


def token_from_env(given: str | None = None) -> str:
    """The join token given on the command line, else from $PAC_JOIN_TOKEN; an empty one is refused."""
    token = given if given is not None else os.environ.get(TOKEN_ENV, "")
    if not token:
        raise PacError(
            f"no join token: set {TOKEN_ENV} to the token `pac-launch` printed (the same on every device), "
            f'e.g. export {TOKEN_ENV}=$(python -c "import secrets; print(secrets.token_hex(16))")'
        )
    return token
