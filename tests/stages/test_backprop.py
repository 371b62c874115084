"""``run_backward`` gives exactly what ``Tensor.backward`` gives, on every path."""

from __future__ import annotations

import subprocess
import sys
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from aimcpipe.analog import AnalogConfig, DeviceConfig, convert
from aimcpipe.stages import backprop, build_model
from aimcpipe.stages.backprop import run_backward


def _grads(use_ours: bool, grad_kind: str) -> list[torch.Tensor]:
    model = convert(build_model("digits-fcn", seed=0), AnalogConfig(device=DeviceConfig()))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g).requires_grad_(True)
    y = model(x)
    if grad_kind == "scalar":
        out, grad = F.cross_entropy(y, torch.arange(8) % 10), None
    else:
        out, grad = y, torch.randn(8, 10, generator=g)
    if use_ours:
        run_backward(out, grad)
    else:
        out.backward(grad)
    params = [p.grad for p in model.parameters() if p.grad is not None]
    records = [
        r for m in model.modules() if hasattr(m, "pending") for rec in m.pending for r in rec
    ]
    return [x.grad, *params, *records]


@pytest.mark.parametrize("grad_kind", ["scalar", "tensor"])
def test_same_gradients_and_records_as_tensor_backward(grad_kind):
    ours, theirs = _grads(True, grad_kind), _grads(False, grad_kind)
    assert len(ours) == len(theirs) > 2
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_the_probe_accepts_this_torch():
    backprop._probed = False
    run_backward(torch.ones(2, requires_grad=True).sum(), None)
    assert backprop._engine is not None  # else every call takes the public path


def test_mismatched_gradients_get_torchs_own_errors():
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="grad can be implicitly created only for scalar"):
        run_backward(w * 2, None)
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        run_backward(w * 2, torch.ones(4))


def test_without_the_private_engine_the_public_path_runs(monkeypatch):
    monkeypatch.setattr(backprop, "_probed", True)
    monkeypatch.setattr(backprop, "_engine", None)
    w = torch.ones(3, requires_grad=True)
    run_backward((w * 2).sum(), None)
    assert torch.equal(w.grad, torch.full((3,), 2.0))


class Tagged(torch.Tensor):
    """A tensor subclass: its ``__torch_function__`` sees every call made through torch."""

    calls: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclasses_take_the_public_path():
    Tagged.calls.clear()
    w = torch.ones(3, requires_grad=True)
    out = (w * 2).as_subclass(Tagged).sum()
    run_backward(out, None)
    assert "backward" in Tagged.calls  # Tensor.backward ran, through the subclass
    assert torch.equal(w.grad, torch.full((3,), 2.0))


def test_building_a_stage_pays_the_first_backward_cost_up_front():
    # PyTorch's first backward(grad) in a process imports torch.fx's symbolic shapes
    # (~250 ms): a stage must pay it when built, not inside its first timed action
    code = (
        "import sys, torch\n"
        "from aimcpipe.stages import backprop\n"
        "from aimcpipe.stages.stage import Stage\n"
        "assert not backprop._probed\n"
        "Stage(0, 2, [('fc', torch.nn.Linear(4, 4))], lr=0.1)\n"
        "assert backprop._probed\n"
        "print('symbolic' if 'torch.fx.experimental.symbolic_shapes' in sys.modules else 'no')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "symbolic"
