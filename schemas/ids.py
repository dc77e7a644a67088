"""Deterministic record ids: the same parts give the same id in every process and every replay,
so the store's ReplacingMergeTree tables keep one row per id.

>>> stable_id("finding", "e1", "abuse.rate_spike") == stable_id("finding", "e1", "abuse.rate_spike")
True
>>> len(stable_id("alert", "x"))
32
"""

from __future__ import annotations

import hashlib


def stable_id(*parts: object) -> str:
    """A 128-bit hex id (BLAKE2b) of ``parts`` joined by the unit separator."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return hashlib.blake2b(text, digest_size=16).hexdigest()
