"""Least-squares reproduction of arXiv 2406.12774 (Fig. 1, Fig. 3/4): the asymptotic error.

Problem (the authors' settings): ``f(w) = ½·mean_n (a_nᵀw − b_n)²`` with D = 40 weights,
N = 100 rows, ``A = randn(N, D)/2``, ``x* = 0.3·randn(D)``, ``b = A x*`` (so f* = 0), full-batch
gradient plus Gaussian noise of standard deviation σ = 0.1 per coordinate, weights start at 0.

Each algorithm writes the noisy gradient ``g`` into a ``1 × D`` weight through its update rule
(``digital-sgd``: exact; ``analog-sgd``: through the asymmetric soft-bounds device;
``tiki-taka``: into the fast tile, transferred to the slow tile every step with α = β). Several
independent replicas run at once as the rows of one tile (an R × D tile whose row r sees
replica r's gradient: update inputs ``x = G`` and errors ``d = I``), each row with its own
gradient noise. The asymptotic error of a run is the mean loss over its last 10 % of
iterations, averaged over replicas.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from aimcpipe.analog.config import AnalogConfig, DeviceConfig, TikiTakaConfig, UpdateConfig
from aimcpipe.analog.rules import build_weight
from aimcpipe.runtime.datasets import lsq_problem
from aimcpipe.seeding import derive_seed

__all__ = ["LsqProblem", "LsqRun", "asymptotic_error", "make_problem", "run_lsq"]

ALGORITHMS = ("digital-sgd", "analog-sgd", "tiki-taka")
MODES = ("expected", "pulsed")


@dataclass(frozen=True)
class LsqProblem:
    a: torch.Tensor  # N × D
    b: torch.Tensor  # N
    x_star: torch.Tensor  # D
    noise_std: float

    def losses(self, w: torch.Tensor) -> torch.Tensor:
        """Loss of each row of ``w`` (R × D)."""
        residual = w.mm(self.a.t()).sub_(self.b)
        return residual.square_().mean(dim=1).mul_(0.5)


PROBLEM_DIM, PROBLEM_SAMPLES = 40, 100  # the paper's least-squares problem


def make_problem(
    seed: int, dim: int = PROBLEM_DIM, samples: int = PROBLEM_SAMPLES, noise_std: float = 0.1
) -> LsqProblem:
    gen = torch.Generator().manual_seed(derive_seed(seed, "lsq-problem"))
    a, x_star = lsq_problem(gen, samples, dim)
    return LsqProblem(a=a, b=a.mv(x_star), x_star=x_star, noise_std=noise_std)


@dataclass(frozen=True)
class LsqRun:
    """One run's record (the keys of ``results.json``)."""

    sweep: str
    algorithm: str
    mode: str
    tau: float
    lr: float
    iterations: int
    asymptotic_error: float
    replicas: int
    dw_min: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def asymptotic_error(losses: torch.Tensor) -> float:
    """Mean loss over the last 10 % of iterations (at least one)."""
    tail = max(1, math.ceil(0.1 * len(losses)))
    return float(losses[-tail:].mean())


def run_lsq(
    problem: LsqProblem,
    *,
    algorithm: str,
    mode: str,
    tau: float,
    lr: float,
    iterations: int,
    dw_min: float,
    replicas: int = 4,
    transfer_ratio: float = 1.0,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Train and return the mean-over-replicas loss at every iteration (before each step).

    ``transfer_ratio`` is Tiki-Taka's α/β (transfer lr over fast-tile lr); the paper's
    setting is 1."""
    dim = problem.a.shape[1]
    config = AnalogConfig(
        rule=algorithm,  # type: ignore[arg-type]
        device=DeviceConfig(kind="soft-bounds", tau=tau, dw_min=dw_min),
        update=UpdateConfig(mode=mode, granularity="batch"),  # type: ignore[arg-type]
        tiki_taka=TikiTakaConfig(transfer_every=1, transfer_lr=transfer_ratio * lr),
    )
    weight = build_weight(
        config,
        replicas,
        dim,
        derive_seed(seed, "lsq", algorithm, mode, tau, lr),
        dtype=problem.a.dtype,
    )
    weight.set_weight(torch.zeros(replicas, dim, dtype=problem.a.dtype))
    # Common random numbers: every algorithm sees the same gradient noise sequence.
    noise_gen = torch.Generator().manual_seed(derive_seed(seed, "lsq-noise", tau, lr))
    eye = torch.eye(replicas, dtype=problem.a.dtype)
    a, b = problem.a, problem.b
    samples = a.shape[0]
    losses = torch.empty(iterations, dtype=torch.float64)
    step_every = max(1, iterations // 100)
    for it in range(iterations):
        w = weight.effective_weight()
        residual = w.mm(a.t()).sub_(b)
        losses[it] = float(residual.square().mean()) * 0.5
        grad = residual.mm(a).div_(samples)
        grad.add_(
            torch.randn(grad.shape, generator=noise_gen, dtype=grad.dtype), alpha=problem.noise_std
        )
        weight.update(grad, eye, lr)
        if progress is not None and (it + 1) % step_every == 0:
            progress(step_every)
    return losses
