"""Seeds derived from a run seed and names, stable across processes and backends.

Every random stream in aimcpipe (a tile's device-to-device draw, its pulses and IO noise, data
shuffling) gets its own seed from ``derive_seed(run_seed, *names)``. Because the names are the
layer's path in the model (not its position in a stage), the same model trains identically
however it is partitioned and wherever its stages run.
"""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``names`` (not on Python's hash salt)."""
    text = "\x1f".join([str(int(seed)), *map(str, names)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
