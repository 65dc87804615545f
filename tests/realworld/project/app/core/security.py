"""Password hashing (with an upgrade path from the old scheme) and signed access tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from datetime import timedelta

from app.core.config import settings

#: The current scheme: PBKDF2-SHA256 (`pbkdf2_sha256$iterations$salt$hash`).
SCHEME = "pbkdf2_sha256"
ITERATIONS = 5_000
#: The scheme of accounts created by the previous version of the app: one salted SHA-256.
LEGACY_SCHEME = "sha256"


def _pbkdf2(password: str, salt: str, iterations: int) -> str:
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return digest.hex()


def get_password_hash(password: str) -> str:
    salt = secrets.token_hex(8)
    return f"{SCHEME}${ITERATIONS}${salt}${_pbkdf2(password, salt, ITERATIONS)}"


def get_legacy_password_hash(password: str) -> str:
    """What the previous version of the app stored (kept to test the upgrade on login)."""
    salt = secrets.token_hex(8)
    return f"{LEGACY_SCHEME}${salt}${hashlib.sha256((salt + password).encode()).hexdigest()}"


def verify_password(plain_password: str, hashed_password: str) -> tuple[bool, str | None]:
    """(verified, new hash): the new hash is set when the stored one must be upgraded."""
    scheme, _, rest = hashed_password.partition("$")
    if scheme == SCHEME:
        iterations, salt, expected = rest.split("$")
        actual = _pbkdf2(plain_password, salt, int(iterations))
        verified = hmac.compare_digest(actual, expected)
        outdated = int(iterations) != ITERATIONS
    elif scheme == LEGACY_SCHEME:
        salt, expected = rest.split("$")
        actual = hashlib.sha256((salt + plain_password).encode()).hexdigest()
        verified = hmac.compare_digest(actual, expected)
        outdated = True
    else:
        return False, None
    if verified and outdated:
        return True, get_password_hash(plain_password)
    return verified, None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign(body: str) -> str:
    key = settings.SECRET_KEY.encode()
    return _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())


def create_access_token(subject: str, expires_delta: timedelta) -> str:
    payload = {"sub": subject, "exp": int(time.time() + expires_delta.total_seconds())}
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    return f"{body}.{_sign(body)}"


def read_access_token(token: str) -> str | None:
    """The token's subject, or None when the token is forged, malformed or expired."""
    body, _, signature = token.partition(".")
    if not body or not hmac.compare_digest(signature, _sign(body)):
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except ValueError:
        return None
    if not isinstance(payload, dict) or payload.get("exp", 0) < time.time():
        return None
    subject = payload.get("sub")
    return subject if isinstance(subject, str) else None
