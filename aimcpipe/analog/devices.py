"""Device response models: how a crossbar realises a requested weight change.

A requested update for inputs ``x`` (b × in) and errors ``d`` (b × out) at learning rate ``lr``
is ``ΔW = −lr · dᵀx`` (docs/design.md §3). A device realises it through response factors:
``W += P ⊙ q+(W) − N ⊙ q−(W)`` with ``P − N = ΔW`` and ``P, N ≥ 0``, then clips to its bounds.

- Expected response, ``batch`` granularity: ``P + N = |ΔW|`` — the papers' equation
  ``W ← W − αg − (α/τ)|g|⊙W`` (arXiv 2406.12774 eq. 3, arXiv 2410.15155 eq. 4).
- Expected response, ``sample`` granularity: ``P + N = lr·|d|ᵀ|x|``, the sum of per-sample
  magnitudes, which is what a pulsed array does in expectation when every sample is written.
- Pulsed: stochastic pulse trains; coincidence counts are products of 0/1 matrices.

Within one update call the response factors are evaluated at the weights before the call
(first order in lr, the same as the expected forms), so pulsed and expected updates agree in
expectation, which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aimcpipe.analog.config import DeviceConfig
from aimcpipe.analog.counting import count_products

__all__ = [
    "DeviceState",
    "apply_response",
    "cycle_to_cycle_std",
    "pulse_counts",
    "requested_update",
    "response_factors",
    "sample_device_state",
]


@dataclass
class DeviceState:
    """Per-tile device parameters: 0-dim tensors, or out × in tensors when device-to-device
    variation is on (drawn once from the tile's seed and kept in its state)."""

    dw_min: torch.Tensor
    w_max: torch.Tensor
    w_min: torch.Tensor
    up_down: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {
            "dw_min": self.dw_min,
            "w_max": self.w_max,
            "w_min": self.w_min,
            "up_down": self.up_down,
        }


def sample_device_state(
    cfg: DeviceConfig,
    shape: tuple[int, int],
    generator: torch.Generator,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DeviceState:
    """Draw per-cross-point parameters. Relative spreads are clipped so that steps stay
    positive, bounds keep enclosing 0 and the up/down asymmetry stays in (−1, 1)."""

    def scalar(v: float) -> torch.Tensor:
        return torch.tensor(v, device=device, dtype=dtype)

    if not cfg.has_dtod:
        return DeviceState(
            scalar(cfg.dw_min), scalar(cfg.w_max), scalar(cfg.w_min), scalar(cfg.up_down)
        )

    def spread(base: float, rel: float, floor: float) -> torch.Tensor:
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return (base * (1.0 + rel * noise)).clamp_(min=floor)

    dw_min = spread(cfg.dw_min, cfg.dw_min_dtod, 0.01 * cfg.dw_min)
    w_max = spread(cfg.w_max, cfg.w_max_dtod, 0.01 * abs(cfg.w_max))
    w_min = -spread(-cfg.w_min, cfg.w_min_dtod, 0.01 * abs(cfg.w_min))
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    up_down = (cfg.up_down + cfg.up_down_dtod * noise).clamp_(-0.99, 0.99)
    return DeviceState(dw_min, w_max, w_min, up_down)


def requested_update(
    x: torch.Tensor, d: torch.Tensor, lr: float, granularity: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(ΔW, A)``: the requested update ``−lr·dᵀx`` and its magnitude ``A = P + N``
    (``|ΔW|`` for ``batch``, ``lr·|d|ᵀ|x|`` for ``sample``)."""
    delta = d.t().mm(x).mul_(-lr)
    if granularity == "batch" or x.shape[0] == 1:
        return delta, delta.abs()
    return delta, d.abs().t().mm(x.abs()).mul_(lr)


def response_factors(
    cfg: DeviceConfig, weight: torch.Tensor, state: DeviceState
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """``(q+(W), q−(W))`` for the device kind (see ``DeviceConfig``)."""
    scale_up = 1.0 + state.up_down
    scale_down = 1.0 - state.up_down
    if cfg.kind == "ideal":
        return 1.0, 1.0
    if cfg.kind == "constant-step":
        return scale_up, scale_down
    if cfg.kind == "soft-bounds":
        q_up = (1.0 - weight / state.w_max) * scale_up
        q_down = (1.0 - weight / state.w_min) * scale_down
        return q_up, q_down
    # power-step
    span = state.w_max - state.w_min
    q_up = (2.0 * (state.w_max - weight) / span).clamp_(min=0).pow_(cfg.pow_gamma) * scale_up
    q_down = (2.0 * (weight - state.w_min) / span).clamp_(min=0).pow_(cfg.pow_gamma) * scale_down
    return q_up, q_down


def _is_plain_soft_bounds(cfg: DeviceConfig, state: DeviceState) -> bool:
    return (
        cfg.kind == "soft-bounds"
        and not cfg.has_dtod
        and cfg.up_down == 0.0
        and cfg.w_min == -cfg.w_max
    )


def apply_response(
    cfg: DeviceConfig,
    weight: torch.Tensor,
    state: DeviceState,
    delta: torch.Tensor,
    magnitude: torch.Tensor,
    *,
    extra: torch.Tensor | None = None,
) -> None:
    """Apply ``W += P⊙q+(W) − N⊙q−(W)`` in place with ``P = (A+ΔW)/2``, ``N = (A−ΔW)/2``,
    then clip to the bounds. ``magnitude`` (A) may be overwritten.

    ``extra`` (optional, same shape as W) is added to the change before clipping: the pulsed
    update passes its sampled cycle-to-cycle noise here.
    """
    if cfg.kind == "ideal":
        weight.add_(delta)
        return
    if _is_plain_soft_bounds(cfg, state) and extra is None:
        # W ← W − (1/τ)·A⊙W + ΔW : the papers' form, three passes over W.
        weight.addcmul_(weight, magnitude, value=-1.0 / cfg.w_max).add_(delta)
        weight.clamp_(cfg.w_min, cfg.w_max)
        return
    q_up, q_down = response_factors(cfg, weight, state)
    pos = (magnitude + delta).mul_(0.5)
    neg = magnitude.sub_(delta).mul_(0.5)
    change = pos.mul_(q_up).sub_(neg.mul_(q_down))
    if extra is not None:
        change.add_(extra)
    weight.add_(change)
    torch.clamp(weight, min=state.w_min, max=state.w_max, out=weight)


_PROB_BITS = 15
_PROB_SCALE = float(2**_PROB_BITS)


def _uniform15(
    shape: tuple[int, ...], generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Integers uniform in [0, 2¹⁵) as int16. Four come out of one 63-bit draw, which makes
    them about five times cheaper than ``torch.rand`` on the CPU (mt19937 is the bottleneck)."""
    count = 1
    for n in shape:
        count *= n
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(
        generator=generator
    )
    return words.view(torch.int16)[:count].view(shape).bitwise_and_(0x7FFF)


def _thresholds(
    v: torch.Tensor, p_max: torch.Tensor, v_max: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """``2¹⁵ · p`` per entry as int16, with ``p = p_max·|v|/max|v|`` per row, rounded up or
    down at random (dithered) so that its expectation is exact even for tiny probabilities."""
    scale = (p_max / v_max.clamp(min=1e-30)).unsqueeze(1)
    dither = torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)
    return v.abs().mul_(scale).add_(dither).floor_().clamp_(max=_PROB_SCALE - 1).to(torch.int16)


def _pad(t: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """``t`` with ``pad`` zero rows (dim 0) or columns (dim 1) appended."""
    if not pad:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def pulse_counts(
    x: torch.Tensor,
    d: torch.Tensor,
    lr: float,
    dw_min: float,
    desired_bl: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic pulse trains for the update ``−lr·dᵀx``, all samples at once.

    Per sample: bit length ``BL = min(ceil(lr·max|x|·max|d| / dw_min), desired_bl)``; with
    ``k = lr·max|x|·max|d| / (dw_min·BL)``, input bit j fires with probability
    ``√k·|x_j|/max|x|`` and error bit i with ``√k·|d_i|/max|d|`` (probabilities capped at 1,
    which truncates updates larger than ``desired_bl`` pulses, as on hardware; probabilities
    are resolved to 2⁻¹⁵ with a random dither, so they are exact in expectation). The
    expected number of coincidences at (i, j) is then ``lr·|d_i x_j| / dw_min``.
    Coincidences of the same bit slot are correlated across a row or column, as on a real
    array: the counts are products of 0/1 matrices, never per-weight loops.

    Returns ``(coincidences, signed)`` as out × in float tensors: the number of pulses that hit
    each cross-point and (#up − #down) among them.
    """
    b, device = x.shape[0], x.device
    x_max = x.abs().amax(dim=1)
    d_max = d.abs().amax(dim=1)
    # lr/dw_min beyond float32 is inf; a zero row times it asks for no pulses, not NaN.
    k = (x_max * d_max).mul_(lr / dw_min).nan_to_num_(nan=0.0)
    bl = k.ceil().clamp_(min=1, max=desired_bl)
    p_max = (k / bl).sqrt_().clamp_(max=1.0).mul_(_PROB_SCALE)
    # Integer thresholds: a bit fires where u < t, u uniform in [0, 2¹⁵), so P = t/2¹⁵ with t
    # the dithered probability (capped at 2¹⁵ − 1). Comparing int16 with int16 keeps the
    # largest arrays (b × BL × n) at two bytes per entry.
    t_x = _thresholds(x, p_max, x_max, generator)
    t_d = _thresholds(d, p_max, d_max, generator)
    length = int(bl.max().item()) if b else 0
    slots = b * length
    u_x = _uniform15((b, length, x.shape[1]), generator, device)
    u_d = _uniform15((d.shape[1], b, length), generator, device)
    inactive = torch.arange(length, device=device).unsqueeze(0) >= bl.unsqueeze(1)  # b × L
    if bool(inactive.any()):  # samples with fewer bits than the longest: silence their slots
        u_d.masked_fill_(inactive.unsqueeze(0), _PROB_SCALE - 1)
    # Pad the bit slots to a multiple of 8 (padding never fires): int8 kernels need it.
    pad = (-slots) % 8
    bits_x = _pad(((u_x < t_x.unsqueeze(1)).view(torch.int8).view(slots, -1)), pad, dim=0)
    bits_d = _pad(((u_d < t_d.t().unsqueeze(2)).view(torch.int8).view(-1, slots)), pad, dim=1)
    coincidences = count_products(bits_d, bits_x)
    # Requested ΔW = −lr·d·x: an up pulse where sign(d)·sign(x) < 0.
    sign_x = torch.sign(x).to(torch.int8).unsqueeze(1).expand(b, length, -1).reshape(slots, -1)
    sign_d = torch.sign(d).to(torch.int8).t().unsqueeze(2).expand(-1, b, length).reshape(-1, slots)
    signed_x = bits_x.mul_(_pad(sign_x, pad, dim=0))
    signed_d = bits_d.mul_(_pad(sign_d, pad, dim=1))
    signed = count_products(signed_d, signed_x).neg_()
    return coincidences, signed


def cycle_to_cycle_std(
    coincidences: torch.Tensor,
    signed: torch.Tensor,
    q_up: torch.Tensor | float,
    q_down: torch.Tensor | float,
    step: torch.Tensor,
    rel_std: float,
) -> torch.Tensor:
    """Standard deviation of the sum of n pulses each ``step·q·(1 + rel_std·ξ)``: the sum of
    n independent normals is ``√n`` times one, so ``√(n_up q+² + n_down q−²)·step·rel_std``."""
    ups = (coincidences + signed).mul_(0.5)
    downs = (coincidences - signed).mul_(0.5)
    var = ups.mul_(torch.as_tensor(q_up) ** 2).add_(downs.mul_(torch.as_tensor(q_down) ** 2))
    return var.sqrt_().mul_(step * rel_std)
