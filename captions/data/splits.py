"""Deterministic splits for sources that do not give one."""

from __future__ import annotations

import hashlib


def hash_split(name: str, val_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
    """Return ``"train"``, ``"val"`` or ``"test"`` for an image name, stable across runs and machines.

    The name's sha1 is mapped to [0, 1); the lowest ``val_fraction`` go to val, the next
    ``test_fraction`` to test. Adding or removing other images never moves this one.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions: val={val_fraction} test={test_fraction}")
    u = int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"
