"""Digital linear layers whose weight gradient is formed at the update."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aimcpipe.stages.deferred_linear import DeferredLinear, defer_linear_gradients
from aimcpipe.stages.stage import Stage


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
        nn.Linear(8, 3),
    )  # fmt: skip


def test_a_stage_trains_like_plain_autograd_and_sgd():
    torch.manual_seed(1)
    xs, ys = torch.randn(4, 5, 6), torch.randint(0, 3, (4, 5))
    ref, model = _mlp(), _mlp()
    stage = Stage(0, 1, list(model.named_children()), lr=0.1, loss_fn=F.cross_entropy)
    for step in range(3):
        ns = list(range(4 * step, 4 * step + 4))
        ref.zero_grad()
        for n in ns:
            (F.cross_entropy(ref(xs[n % 4]), ys[n % 4]) / 4).backward()
            stage.forward(n, xs[n % 4], ys[n % 4])
            stage.backward(n)
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.1 * p.grad
        stage.update(ns)
    for (name, got), want in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    assert all(p.grad is None for p in model.parameters())  # no gradient set left behind


def test_the_users_modules_are_left_as_they_were_and_share_the_weights():
    model = _mlp()
    blocks, layers = defer_linear_gradients(list(model.children()))
    assert len(layers) == 3 and all(type(m) is DeferredLinear for m in layers)
    assert all(type(m) is not DeferredLinear for m in model.modules())
    assert blocks[0] is not model[0] and blocks[0][1] is model[0][1]  # only paths are copied
    assert layers[0].weight is model[0][0].weight and layers[2].bias is model[2].bias
    # a block holding no linear layer is the user's own object
    act = nn.ReLU()
    assert defer_linear_gradients([act])[0][0] is act


def test_backward_keeps_the_pairs_and_gives_the_input_gradient():
    torch.manual_seed(2)
    plain = nn.Linear(4, 3)
    layer = DeferredLinear.sharing(plain)
    x = torch.randn(5, 4, requires_grad=True)
    d = torch.randn(5, 3)
    layer(x).backward(d)
    assert plain.weight.grad is None
    ((kept_x, kept_d),) = layer.pending
    assert torch.equal(kept_x, x) and torch.equal(kept_d, d)
    torch.testing.assert_close(x.grad, d @ plain.weight)
    with torch.no_grad():  # outside autograd it is a plain linear, keeping nothing
        torch.testing.assert_close(layer(x), plain(x))
    assert len(layer.pending) == 1


def test_the_pending_pairs_count_in_the_stash_bytes():
    model = _mlp()
    stage = Stage(0, 1, list(model.named_children()), lr=0.1, loss_fn=F.cross_entropy)
    stage.forward(0, torch.randn(5, 6), torch.randint(0, 3, (5,)))
    stage.backward(0)
    # (x, d) per linear layer: 5 rows × (6+8, 8+8, 8+3) float32
    assert stage._held_bytes >= 5 * (14 + 16 + 11) * 4
