"""How an API key is stored: a pure function that reads and writes both use."""

from __future__ import annotations

import hashlib


def hash_api_key(raw_key: str) -> str:
    """Keys carry 256 random bits, so a plain sha256 is enough (no slow KDF needed)."""
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()
