"""MagnitudePruner and FixedMask: the schedule, real training to the target, export, resume."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l0core import FixedMask, L0Regularizer, MagnitudePruner, cubic_sparsity

from .models import mlp


def _task(n: int = 512, d: int = 20, classes: int = 4, seed: int = 0):
    """A linearly separable task that a small MLP learns in a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, classes, generator=g)).argmax(1)
    return x, y


def _fit(method: nn.Module, x, y, steps: int, lr: float = 1e-2, opt=None):
    opt = opt or torch.optim.Adam(method.parameters(), lr=lr)
    method.train()
    for i in range(steps):
        idx = torch.arange(i * 64, (i + 1) * 64) % len(x)
        loss = F.cross_entropy(method(x[idx]), y[idx]) + method.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def _accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_cubic_schedule_ramps_from_begin_to_end_in_held_steps():
    s = [cubic_sparsity(t, 0.9, 10, 110, frequency=10) for t in range(130)]
    assert s[:10] == [0.0] * 10 and s[10] == 0.0
    assert s[110:] == [0.9] * 20
    assert all(a <= b for a, b in itertools.pairwise(s))
    assert s[20:30] == [s[20]] * 10  # held between updates
    assert s[20] == pytest.approx(0.9 * (1 - 0.9**3))
    assert s[60] == pytest.approx(0.9 * (1 - 0.5**3))  # steep early, flat late
    assert [cubic_sparsity(t, 0.5, 7, 7) for t in (6, 7, 8)] == [0.0, 0.5, 0.5]  # one-shot


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_training_reaches_the_target_and_keeps_learning(scope):
    x, y = _task()
    model = mlp((20, 64, 32, 4))
    pruner = MagnitudePruner(model, 0.9, end_step=150, frequency=10, scope=scope)
    n = 20 * 64 + 64 * 32 + 32 * 4
    assert pruner.n_gated == n and pruner.sparsity() == 0.0
    _fit(pruner, x, y, 100)
    mid = pruner.sparsity()
    assert 0.0 < mid < 0.9
    _fit(pruner, x, y, 150)
    assert pruner.steps == 250
    assert pruner.sparsity() == pytest.approx(0.9, abs=1 / n)
    assert int(pruner.count_l0()) == n - round(0.9 * n)
    densities = [r.eval_density for r in pruner.summary() if r.gated]
    if scope == "layer":
        assert densities == pytest.approx([0.1] * 3, abs=0.01)
    else:
        assert max(densities) - min(densities) > 0.02  # global ranking: layers differ
    assert _accuracy(pruner, x, y) > 0.8  # chance is about 0.25


def test_pruned_weights_never_return_and_get_no_gradient():
    x, y = _task()
    pruner = MagnitudePruner(mlp((20, 16, 4)), 0.8, end_step=60, frequency=5)
    history = []
    opt = None
    for _ in range(8):
        opt = _fit(pruner, x, y, 10, opt=opt)
        history.append([m.clone() for m in pruner._masks()])
    for before, after in itertools.pairwise(history):
        for a, b in zip(before, after, strict=True):
            assert bool((b <= a).all())  # a zero stays zero
    pruner(x[:8]).sum().backward()
    for orig, mask in zip(pruner._origs(), pruner._masks(), strict=True):
        assert bool((orig.grad[mask == 0] == 0).all())


def test_prune_is_a_plain_module_equal_to_the_masked_eval_outputs():
    x, y = _task()
    model = mlp((20, 32, 16, 4))
    keys = set(model.state_dict())
    pruner = MagnitudePruner(model, 0.75, end_step=40, frequency=4, exclude="2.weight")
    _fit(pruner, x, y, 60)
    pruner.eval()
    with torch.no_grad():
        masked = pruner(x)
    plain = pruner.prune().model
    assert set(plain.state_dict()) == keys
    assert not any(m._forward_pre_hooks for m in plain.modules())
    assert not plain.training
    with torch.no_grad():
        assert torch.equal(plain(x), masked)
    zeros = sum(int((plain.get_parameter(n) == 0).sum()) for n in ("0.weight", "4.weight"))
    assert zeros == round(0.75 * (20 * 32 + 16 * 4))
    assert int((plain[2].weight == 0).sum()) == 0  # excluded: never pruned
    assert pruner.expected_flops() == float(pruner.count_l0()) + 32 * 16


def test_a_checkpoint_resumes_the_same_schedule():
    x, y = _task()
    torch.manual_seed(1)
    a = MagnitudePruner(mlp((20, 16, 4)), 0.9, end_step=50, frequency=5)
    opt_a = _fit(a, x, y, 20)
    # copies: state dicts alias the live tensors (an optimizer's even after loading)
    state, opt_state = copy.deepcopy(a.state_dict()), copy.deepcopy(opt_a.state_dict())
    torch.manual_seed(2)
    b = MagnitudePruner(mlp((20, 16, 4)), 0.9, end_step=50, frequency=5)
    b.load_state_dict(state)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    opt_b.load_state_dict(opt_state)
    assert b.steps == 20 and b.sparsity() == a.sparsity()
    _fit(a, x, y, 40, opt=opt_a)
    _fit(b, x, y, 40, opt=opt_b)
    for ka, kb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert ka == kb if isinstance(ka, dict) else torch.equal(ka, kb)


def test_fixed_mask_keeps_an_l0_models_zeros_while_the_rest_trains():
    x, y = _task()
    reg = L0Regularizer(mlp((20, 32, 4)), 0.0, granularity="output", droprate_init=0.5)
    with torch.no_grad():
        reg.unit_log_alpha[:16] = -10.0  # half of the first layer's units off
    plain = reg.prune().model
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    fixed = FixedMask(plain)
    assert fixed.sparsity() == pytest.approx(16 * 20 / (20 * 32 + 32 * 4))
    assert list(fixed.gate_parameters()) == [] and float(fixed.regularization()) == 0.0
    _fit(fixed, x, y, 50)
    tuned = fixed.prune().model
    for name, p in tuned.named_parameters():
        was_zero = before[name] == 0
        assert bool((p[was_zero] == 0).all()), name  # dead rows and their biases stay dead
        assert bool((p[~was_zero] != before[name][~was_zero]).any()), name  # the rest trained
    shrunk, report = fixed.prune(shrink=True)
    assert report.architecture_after == [20, 16, 4]
    with torch.no_grad():
        assert torch.allclose(shrunk(x), tuned(x), atol=1e-5)


def test_bad_arguments_name_the_value_and_the_allowed_ones():
    model = mlp((4, 3, 2))
    with pytest.raises(ValueError, match=r"target_sparsity must be a number in \(0, 1\), got 1.0"):
        MagnitudePruner(model, 1.0, end_step=10)
    with pytest.raises(ValueError, match=r"scope must be one of \('global', 'layer'\), got 'row'"):
        MagnitudePruner(model, 0.5, end_step=10, scope="row")
    with pytest.raises(ValueError, match="end_step must be an integer >= 5, got 3"):
        MagnitudePruner(model, 0.5, end_step=3, begin_step=5)
    with pytest.raises(ValueError, match="frequency must be an integer >= 1, got 0"):
        MagnitudePruner(model, 0.5, end_step=3, frequency=0)
    with pytest.raises(ValueError, match="matches no parameter"):
        MagnitudePruner(model, 0.5, end_step=3, include="conv*")
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="tied parameters"):
        MagnitudePruner(tied, 0.5, end_step=3)
