"""SSH credentials: random tokens that double as usernames, stored only as hashes."""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import string

ALPHABET = string.ascii_lowercase + string.digits
TOKEN_BITS = 128
TOKEN_LENGTH = math.ceil(TOKEN_BITS / math.log2(len(ALPHABET)))  # 25 characters, 129 bits


def generate_token() -> str:
    """A fresh token: at least 128 random bits, lowercase letters and digits only."""
    return "".join(secrets.choice(ALPHABET) for _ in range(TOKEN_LENGTH))


def hash_token(token: str) -> str:
    """The form a token is stored in: its SHA-256 as hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_matches(token: str, token_hash: str) -> bool:
    """Does `token` hash to `token_hash`? Constant time in the hash comparison."""
    return hmac.compare_digest(hash_token(token), token_hash)
