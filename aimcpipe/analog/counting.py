"""Exact pulse-coincidence counts: the fastest exact product of 0/±1 matrices on this machine.

The pulsed update spends nearly all its time in two products ``bits_d @ bits_x`` of matrices
whose entries are −1, 0 or 1 (out × slots times slots × in, slots = batch × bit length).
Several kernels compute them exactly, and which is fastest depends on the processor far
more than on anything we can read from it: on one 2-core AMD EPYC (AVX2) int8 × int8 → int32
(``torch._int_mm``) ran 75× slower than a float32 product of the same size, while on an
Intel Xeon with AMX it is the fastest of all. So the kernel is chosen by measurement, once
per process, device and *shape class* (each dimension rounded up to a power of two), among
the candidates that the device supports (products of under 2²⁰ multiply-adds, where any
kernel takes microseconds, use ``float32`` without measuring; the probe is capped at
512 × 8192 × 512, so the first product of a new class costs at most a few hundred
milliseconds, and a probe that fails, e.g. for lack of device memory, settles on float32):

``float32``
    ``a.float() @ b.float()``. Always available; it is the reference every other candidate
    is checked against on the probe.
``int8``
    ``torch._int_mm(a, b)`` (int32 accumulation, exact). A private PyTorch op: used only if it
    exists, accepts the shape, and agrees with ``float32`` on the probe.
``int8-colmajor``
    The same with ``b`` laid out column-major (oneDNN's preferred layout on some CPUs); the
    layout change is part of the time measured.
``bfloat16``, ``float16``
    Half-precision batched products over slices of 256 (bfloat16) or 2048 (float16) slots,
    summed in float32: every slice's counts are small enough integers for the half type to
    hold exactly, so the result is exact in any accumulation order. Fast where the processor
    has native half-precision products (AVX-512 BF16/FP16, AMX, GPUs).

Bit-packed counting (popcount of AND over 64-slot words) was considered and left out: torch
has no population-count operator, and emulating one costs more than a float32 product.

Counts are returned as float32, exact up to 2²⁴ coincidences per cross-point (far beyond
any batch × bit length in practice). Whichever kernel runs, the counts are the same integers
and the random stream is untouched (the bits are drawn before the product), so the choice
never changes a result. A product that the chosen kernel refuses (a shape rule of a member
of its class that the probe did not meet, or a forced kernel this torch lacks) is counted by
``float32`` instead. Every kernel works through the inner dimension in blocks, so its
working copies stay bounded however many slots a product has. The environment
variable ``AIMCPIPE_COUNT_KERNEL`` forces one candidate (for tests and benchmarks);
:func:`chosen` reports what was picked.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from aimcpipe.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "CANDIDATES",
    "ENV",
    "chosen",
    "count_products",
    "forced",
    "kernel_for",
    "reset",
    "usable",
]

ENV = "AIMCPIPE_COUNT_KERNEL"

Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# Kernels work through the inner dimension in blocks, so that their float or half copies of
# the operands (and the chunked kernels' partial products) stay a bounded size however many
# slots a product has.
_BLOCK_K = 1 << 16
_PARTIALS = 1 << 24  # elements of partial products held at once by the chunked kernels


def _float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    k = a.shape[1]
    if k <= _BLOCK_K:
        return a.to(torch.float32).mm(b.to(torch.float32))
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    for lo in range(0, k, _BLOCK_K):
        hi = min(k, lo + _BLOCK_K)
        out.addmm_(a[:, lo:hi].to(torch.float32), b[lo:hi].to(torch.float32))
    return out


def _int8(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(a, b).to(torch.float32)


def _int8_colmajor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(a, b.t().contiguous().t()).to(torch.float32)


def _chunked(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, chunk: int) -> torch.Tensor:
    """Half-precision products over slices of ``chunk`` slots, summed in float32. Each slice's
    counts are integers of magnitude ≤ ``chunk``, which the half type holds exactly, so the
    result is exact whatever precision the product accumulates in."""
    m, k = a.shape
    n = b.shape[1]
    chunk = min(chunk, k)  # a shorter product is one slice
    pad = (-k) % chunk
    if pad:
        a = torch.cat([a, a.new_zeros(m, pad)], dim=1)
        b = torch.cat([b, b.new_zeros(pad, n)], dim=0)
    q = (k + pad) // chunk
    group = max(1, _PARTIALS // max(1, m * n))  # slices per batched product
    out = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    for lo in range(0, q, group):
        hi = min(q, lo + group)
        left = a[:, lo * chunk : hi * chunk].to(dtype).view(m, hi - lo, chunk).transpose(0, 1)
        right = b[lo * chunk : hi * chunk].to(dtype).view(hi - lo, chunk, n)
        out.add_(torch.bmm(left, right).sum(dim=0, dtype=torch.float32))
    return out


def _bfloat16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _chunked(a, b, torch.bfloat16, 256)  # bfloat16 holds integers up to 2⁸ exactly


def _float16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _chunked(a, b, torch.float16, 2048)  # float16 holds integers up to 2¹¹ exactly


@dataclass(frozen=True)
class Candidate:
    """A kernel and where it may run at all (the probe decides the rest)."""

    name: str
    run: Kernel
    devices: tuple[str, ...]


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("float32", _float32, ("cpu", "cuda")),
    Candidate("int8", _int8, ("cpu", "cuda")),
    Candidate("int8-colmajor", _int8_colmajor, ("cpu",)),
    Candidate("bfloat16", _bfloat16, ("cpu", "cuda")),
    Candidate("float16", _float16, ("cpu", "cuda")),
)
_BY_NAME = {c.name: c for c in CANDIDATES}

# A candidate is first screened on a corner of the product (see _measure).
_SCREEN_K, _SCREEN_MN = 128, 256
_SCREEN_RATIO = 3.0
# The probe itself is at most this big (a class larger in any dimension is represented by
# it), so that measuring costs well under a second and little memory.
_PROBE_MN, _PROBE_K = 512, 8192
# Below this many multiply-adds every kernel takes microseconds: float32, without measuring.
_SMALL = 1 << 20

_lock = threading.Lock()
_choices: dict[tuple[str, int | None, int, int, int], str] = {}


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _shape_class(a: torch.Tensor, b: torch.Tensor) -> tuple[str, int | None, int, int, int]:
    m, k = a.shape
    return (a.device.type, a.device.index, _bucket(m), _bucket(k), _bucket(b.shape[1]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(kernel: Kernel, a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """The best of ``repeats`` runs, in seconds (after one untimed run)."""
    kernel(a, b)
    _sync(a.device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        kernel(a, b)
        _sync(a.device)
        best = min(best, time.perf_counter() - start)
    return best


def _probe_matrices(
    m: int, k: int, n: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random matrices with entries in {−1, 0, 1}, from a generator of their own (never the
    global one, which belongs to the stages)."""
    g = torch.Generator().manual_seed(12345)
    a = torch.randint(-1, 2, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-1, 2, (k, n), generator=g, dtype=torch.int8)
    return a.to(device), b.to(device)


def _exact(candidate: Candidate, a: torch.Tensor, b: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether the candidate runs on these shapes here and gives exactly ``want``."""
    try:
        return bool(torch.equal(candidate.run(a, b), want))
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        return False


def usable(device: torch.device | str = "cpu") -> list[str]:
    """The candidates that run on ``device`` here and count a small probe exactly."""
    device = torch.device(device)
    a, b = _probe_matrices(64, 256, 64, device)
    want = _float32(a, b)
    return [c.name for c in CANDIDATES if device.type in c.devices and _exact(c, a, b, want)]


def _measure(m: int, k: int, n: int, device: torch.device) -> str:
    """The fastest exact candidate for an (m × k) @ (k × n) product on ``device``.

    Each candidate is first screened on a small corner of the product (exactness, and a
    speed within :data:`_SCREEN_RATIO` of float32's), so that one which is very slow on this
    processor — half precision without hardware support ran 100–250× slower than float32
    in a trial — costs milliseconds to rule out; the survivors are checked and timed at the
    class's full size."""
    a, b = _probe_matrices(m, k, n, device)
    sm, sk, sn = min(m, _SCREEN_MN), min(k, _SCREEN_K), min(n, _SCREEN_MN)
    a_small, b_small = a[:sm, :sk].contiguous(), b[:sk, :sn].contiguous()
    want_small = _float32(a_small, b_small)
    slow = _SCREEN_RATIO * _timed(_float32, a_small, b_small, repeats=2)
    want = _float32(a, b)
    times = {"float32": _timed(_float32, a, b, repeats=3)}
    for candidate in CANDIDATES[1:]:
        if device.type not in candidate.devices:
            continue
        if not _exact(candidate, a_small, b_small, want_small):
            continue
        if _timed(candidate.run, a_small, b_small, repeats=2) > slow:
            continue
        if _exact(candidate, a, b, want):
            times[candidate.name] = _timed(candidate.run, a, b, repeats=3)
    best = min(times, key=times.__getitem__)
    measured = ", ".join(f"{name} {1e3 * t:.3g} ms" for name, t in times.items())
    log.info("count kernel for %s %dx%dx%d: %s (%s)", device, m, k, n, best, measured)
    return best


def forced() -> str:
    """The kernel named by ``AIMCPIPE_COUNT_KERNEL`` (``auto`` if unset); raises
    :class:`ConfigError` naming the variable and the allowed values for anything else (the
    CLI checks it before any work starts)."""
    name = os.environ.get(ENV, "auto").strip() or "auto"
    if name != "auto" and name not in _BY_NAME:
        allowed = ", ".join(["auto", *_BY_NAME])
        raise ConfigError(f"{ENV}={name!r} is not a count kernel; allowed: {allowed}")
    return name


def kernel_for(a: torch.Tensor, b: torch.Tensor) -> str:
    """The name of the kernel that counts ``a @ b`` (measured on first use of its class)."""
    name = forced()
    if name != "auto":
        return name
    key = _shape_class(a, b)
    if key[2] * key[3] * key[4] <= _SMALL:
        return "float32"
    with _lock:
        name = _choices.get(key)
        if name is None:
            _, _, m, k, n = key
            # measure at the class's own size (its upper bound, capped), so that every member
            # of the class is represented by the same probe
            try:
                name = _measure(min(m, _PROBE_MN), min(k, _PROBE_K), min(n, _PROBE_MN), a.device)
            except (RuntimeError, MemoryError) as exc:  # e.g. out of device memory
                log.warning("count kernel probe failed (%s); using float32", exc)
                name = "float32"
            _choices[key] = name
    return name


def count_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` as float32 for int8 matrices with entries in {−1, 0, 1}."""
    if a.shape[0] == 0 or a.shape[1] == 0 or b.shape[1] == 0:
        return torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    name = kernel_for(a, b)
    if name == "float32":
        return _float32(a, b)
    try:
        return _BY_NAME[name].run(a, b)
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        # a shape rule the class's probe did not meet, or a forced kernel this torch lacks
        return _float32(a, b)


def chosen() -> dict[str, str]:
    """What has been picked so far in this process: ``"device m×k×n" -> kernel``, with each
    dimension of the shape class rounded up to a power of two."""
    with _lock:
        return {
            f"{dev}{'' if idx is None else f':{idx}'} {m}x{k}x{n}": name
            for (dev, idx, m, k, n), name in sorted(_choices.items(), key=str)
        }


def reset() -> None:
    """Forget every choice (the next product measures again)."""
    with _lock:
        _choices.clear()
