"""Password hashing and API key generation."""

import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

API_KEY_PREFIX = "jb_"
AGENT_TOKEN_PREFIX = "jba_"
PREFIX_CHARS = 8

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    """Hash a web password with argon2id."""
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Check a password against its argon2 hash."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def generate_password() -> str:
    """Return a random password for generated accounts."""
    return secrets.token_urlsafe(15)


def generate_api_key() -> tuple[str, str, str]:
    """Return a new API key as (key, prefix, hash); only the hash is stored."""
    prefix = secrets.token_hex(PREFIX_CHARS // 2)
    key = f"{API_KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    return key, prefix, hash_api_key(key)


def generate_agent_token() -> tuple[str, str]:
    """Return a new pull-agent token and its hash; only the hash is stored."""
    token = f"{AGENT_TOKEN_PREFIX}{secrets.token_urlsafe(32)}"
    return token, hash_api_key(token)


def hash_api_key(key: str) -> str:
    """Hash an API key with SHA-256.

    The keys carry 256 random bits, so a fast hash is enough; a slow password
    hash would cost every job submission tens of milliseconds.
    """
    return hashlib.sha256(key.encode()).hexdigest()


def same_digest(left: str, right: str) -> bool:
    """Compare two digests in constant time."""
    return hmac.compare_digest(left.encode(), right.encode())
