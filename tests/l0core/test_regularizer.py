"""L0Regularizer on plain models: counts, gradients, modes, export, checkpoints, dtypes, bad input."""

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l0core import L0Regularizer
from l0core.functional import HardConcrete, prob_nonzero

from .models import cnn_bn, mlp

GRANULARITIES = ["weight", "output", "input"]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_count_l0_is_expected_number_of_kept_gated_parameters(granularity):
    model = mlp((20, 16, 8, 4))
    reg = L0Regularizer(model, 0.1, granularity=granularity, droprate_init=0.5)
    # every gated weight starts at log_alpha ~ 0: P(z != 0) ~ 0.83 per gate; output gates leave
    # the last layer alone (its units are the model's outputs)
    n_weights = 20 * 16 + 16 * 8 + (8 * 4 if granularity != "output" else 0)
    assert reg.n_gated == n_weights
    p = prob_nonzero(torch.tensor(0.0), HardConcrete()).item()
    assert reg.count_l0().item() == pytest.approx(p * n_weights, rel=0.02)
    assert reg.regularization().item() == pytest.approx(0.1 * p * n_weights, rel=0.02)
    assert reg.expected_density().item() == pytest.approx(p, rel=0.02)


def test_count_l2_weights_each_group_by_its_probability():
    model = mlp((6, 5, 3))
    reg = L0Regularizer(model, 0.0, weight_decay=1.0, granularity="output")
    pw, pu = reg._prob_nonzero()
    p = torch.cat([t for t in (pw, pu) if t is not None])
    by_site = {s.name: p[s.slice] for s in reg._wsites + reg._asites}
    assert set(by_site) == {"0.weight"}  # 2's units are the model's outputs: not gated
    expected = (by_site["0.weight"] * model.get_parameter("0.weight").pow(2).sum(1)).sum()
    assert reg.count_l2().item() == pytest.approx(expected.item(), rel=1e-5)
    assert reg.regularization().item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gradients_reach_weights_and_gate_logits(granularity):
    model = mlp((12, 10, 3))
    reg = L0Regularizer(model, 0.01, granularity=granularity)
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    (F.cross_entropy(reg(x), y) + reg.regularization()).backward()
    for p in reg.gate_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_train_samples_differ_and_eval_is_deterministic(granularity):
    reg = L0Regularizer(mlp((12, 10, 3)), 0.01, granularity=granularity, droprate_init=0.5)
    x = torch.randn(8, 12)
    a, b = reg(x), reg(x)
    assert not torch.allclose(a, b)
    reg.eval()
    with torch.no_grad():
        c, d = reg(x), reg(x)
    assert torch.equal(c, d)
    assert torch.equal(c, reg(x).detach())  # the differentiable eval path agrees with the cache


def test_eval_cache_follows_logit_updates():
    reg = L0Regularizer(mlp((12, 10, 3)), 0.01).eval()
    x = torch.randn(4, 12)
    with torch.no_grad():
        before = reg(x)
        reg.weight_log_alpha.fill_(-10.0)  # close every gate
        after = reg(x)
    assert not torch.equal(before, after)
    assert torch.allclose(after, reg.module[-1].bias.expand_as(after))
    assert reg.sparsity() == 1.0


def test_per_sample_gates_differ_between_examples():
    reg = L0Regularizer(
        mlp((12, 64, 3)), 0.0, granularity="output", per_sample=True, droprate_init=0.5
    )
    x = torch.randn(1, 12).expand(32, 12)
    out = reg(x)
    assert out.std(0).sum() > 0  # the same input, different gates per example
    reg.eval()
    out = reg(x)
    assert torch.allclose(out.std(0), torch.zeros(3), atol=1e-6)


def test_output_gates_after_batchnorm_close_channels_exactly():
    model = cnn_bn()
    reg = L0Regularizer(model, 0.0, granularity="output")
    applied = {s.name: [m.name for m in s.masked] for s in reg._wsites}
    assert applied["0.weight"] == ["1.weight", "1.bias"]  # the BatchNorm after the conv
    assert applied["4.weight"] == ["5.weight", "5.bias"]
    with torch.no_grad():
        reg.weight_log_alpha[:4] = -10.0  # close the first 4 channels of conv 0
    reg.train()
    feats = {}
    model[2].register_forward_hook(lambda m, i, o: feats.setdefault("relu", o))
    reg(torch.randn(8, 3, 12, 12))
    assert (feats["relu"][:, :4] == 0).all() and (feats["relu"][:, 4:] != 0).any()


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("build", [lambda: mlp((20, 16, 8, 4)), cnn_bn])
def test_prune_equals_gated_eval_output(granularity, build):
    model = build()
    reg = L0Regularizer(model, 0.0, granularity=granularity, droprate_init=0.5)
    with torch.no_grad():
        for la in reg.gate_parameters():
            la.normal_(0.0, 3.0)  # a mix of closed, partly open and open gates
    x = torch.randn(6, 20) if isinstance(model[0], nn.Linear) else torch.randn(6, 3, 12, 12)
    reg(x)  # a training step's batch statistics
    reg.eval()
    with torch.no_grad():
        gated = reg(x)
        pruned = reg.prune().model
        assert not any("l0core" in type(m).__module__ for m in pruned.modules())
        assert torch.allclose(pruned(x), gated, atol=1e-5)
    assert 0 < reg.sparsity() < 1
    zero = sum(int((pruned.get_parameter(s.name) == 0).sum()) for s in reg._wsites + reg._asites)
    if granularity == "weight":
        assert zero == round(reg.sparsity() * reg.n_gated)
    pickle.loads(pickle.dumps(pruned))


def test_prune_shrink_removes_closed_units_and_keeps_outputs():
    pytest.importorskip("l0core.export")
    model = mlp((20, 16, 8, 4))
    reg = L0Regularizer(model, 0.0, granularity="output")
    with torch.no_grad():
        reg.unit_log_alpha.fill_(5.0)
        reg.unit_log_alpha[:10] = -8.0  # close 10 of 16 units of layer 0
        reg.unit_log_alpha[16:19] = -8.0  # and 3 of 8 of layer 1
    reg.eval()
    x = torch.randn(5, 20)
    with torch.no_grad():
        small, report = reg.prune(shrink=True)
        assert torch.allclose(small(x), reg(x), atol=1e-5)
    assert report.architecture_after == [20, 6, 5, 4]
    assert report.params_after == sum(p.numel() for p in small.parameters())
    assert report.params_after < report.params_before


def test_state_dict_keys_unchanged_and_plain_checkpoint_loads():
    model = cnn_bn()
    keys = set(model.state_dict())
    reg = L0Regularizer(model, 0.1, granularity="output")
    assert set(reg.module.state_dict()) == keys
    plain = cnn_bn()
    reg.module.load_state_dict(plain.state_dict())  # an unwrapped checkpoint loads
    assert torch.equal(reg.module[0].weight, plain[0].weight)
    # and the whole wrapper round-trips through its own state_dict
    buf = io.BytesIO()
    torch.save(reg.state_dict(), buf)
    other = L0Regularizer(cnn_bn(), 0.1, granularity="output")
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    reg.eval(), other.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(reg(x), other(x))


def test_deepcopy_pickle_and_device_moves():
    reg = L0Regularizer(mlp((10, 8, 3)), 0.1, granularity="output", target_sparsity=0.5)
    reg(torch.randn(4, 10))
    x = torch.randn(3, 10)
    for clone in (copy.deepcopy(reg), pickle.loads(pickle.dumps(reg))):
        clone.eval(), reg.eval()
        with torch.no_grad():
            assert torch.equal(clone(x), reg(x))
        # the clone's gates are its own
        with torch.no_grad():
            clone.unit_log_alpha.fill_(-10)
        assert reg.sparsity() < 1 and clone.sparsity() == 1
    reg.to("cpu")
    assert reg.weight_parameters().__next__().device.type == "cpu"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_low_and_high_precision(dtype):
    reg = L0Regularizer(mlp((10, 8, 3)), 0.1).to(dtype)
    x = torch.randn(4, 10, dtype=dtype)
    out = reg(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    loss = out.float().pow(2).mean() + reg.regularization().float()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in reg.gate_parameters())
    with torch.no_grad():
        reg.weight_log_alpha.fill_(1e4)  # far outside the bound: clamped on the next step
    reg(x)
    assert reg.weight_log_alpha.abs().max() <= 10
    reg.eval()
    assert torch.isfinite(reg(x)).all()


def test_include_exclude_and_callables():
    model = cnn_bn()
    assert {s.name for s in L0Regularizer(model, 0.1, exclude="Linear")._wsites} == {
        "0.weight",
        "4.weight",
    }
    reg = L0Regularizer(model, 0.1, include="*")
    assert reg.n_gated == sum(p.numel() for p in model.parameters())
    reg = L0Regularizer(model, 0.1, include=lambda name, p, m: isinstance(m, nn.Linear))
    assert [s.name for s in reg._wsites] == [
        "9.weight",
        "9.bias",
    ]  # a callable replaces the default
    reg = L0Regularizer(model, 0.1, droprate_init={"0.*": 0.5, "*": 0.05})
    assert reg.weight_log_alpha[: 8 * 27].mean().item() == pytest.approx(0.0, abs=0.01)
    assert reg.weight_log_alpha[-80:].mean().item() == pytest.approx(2.944, abs=0.01)


def test_magnitude_init_opens_gates_of_large_weights():
    model = mlp((30, 20, 5))
    reg = L0Regularizer(model, 0.1, droprate_init=0.05, init="magnitude")
    w = model[0].weight.detach().flatten()
    la = reg.weight_log_alpha[: w.numel()].detach()
    assert torch.equal(w.abs().argsort(), la.argsort())  # larger weight, more open gate
    assert prob_nonzero(la, reg.hc).min() > 0.9  # every gate starts open enough to fine-tune


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lam": -1.0}, r"lam must be a finite number >= 0.0, got -1.0"),
        ({"lam": float("nan")}, "lam must be a finite number"),
        ({"lam": 0.1, "granularity": "row"}, r"granularity must be one of .* got 'row'"),
        ({"lam": 0.1, "test_gate": "mode"}, r"test_gate must be 'mean' or 'median', got 'mode'"),
        (
            {"lam": 0.1, "droprate_init": 0.0},
            r"droprate_init must be a number in \(0, 1\), got 0.0",
        ),
        ({"lam": 0.1, "droprate_init": {"nope.*": 0.2}}, "'nope.\\*' matches no gated parameter"),
        ({"lam": 0.1, "exclude": "conv*"}, "exclude pattern 'conv\\*' matches no parameter"),
        ({"lam": 0.1, "include": ["*.weight", "enc.*"]}, r"include pattern 'enc\.\*' matches no"),
        ({"lam": 0.1, "granularity": None}, r"granularity must be one of .*'output'.* got None"),
        ({"lam": 0.1, "granularity": "Output"}, r"granularity must be one of .* got 'Output'"),
        ({"lam": 0.1, "include": "*.bias", "exclude": "*.bias"}, "nothing to regularize"),
        (
            {"lam": 0.1, "target_sparsity": 1.0},
            r"target_sparsity must be a number in \(0, 1\), got 1.0",
        ),
        ({"lam": 0.1, "per_sample": True}, "per_sample=True needs structured gates"),
        ({"lam": 0.1, "init": "zeros"}, "init must be 'random' or 'magnitude', got 'zeros'"),
        ({"lam": 0.1, "limit_b": 0.9}, "limit_b must be > 1"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(kwargs, match):
    with pytest.raises(ValueError, match=match):
        L0Regularizer(mlp((10, 8, 3)), **kwargs)


def test_module_with_nothing_to_gate_is_rejected():
    with pytest.raises(ValueError, match="nothing to regularize in ReLU"):
        L0Regularizer(nn.ReLU(), 0.1)
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        L0Regularizer("model", 0.1)


def test_summary_and_expected_flops():
    model = cnn_bn()
    reg = L0Regularizer(model, 0.1, granularity="output", droprate_init=0.5)
    reg(torch.randn(2, 3, 12, 12))
    rows = {r.name: r for r in reg.summary()}
    assert rows["0.weight"].gated and rows["0.weight"].applied == "weight"
    assert not rows["0.bias"].gated and rows["1.weight"].expected_density == 1.0
    assert not rows["9.weight"].gated  # the classifier's units are the model's outputs
    p = prob_nonzero(torch.tensor(0.0), reg.hc).item()
    dense = 12 * 12 * 8 * 27 + 6 * 6 * 16 * 72 + 16 * 5
    # a weight counts when its row and its column are both open: the first conv reads the input
    # (always there), the second conv and the Linear read gated units (the cascade), and the
    # Linear's own rows are always there
    expected = p * 12 * 12 * 8 * 27 + p * p * 6 * 6 * 16 * 72 + p * 16 * 5
    assert reg.expected_flops() == pytest.approx(expected, rel=0.02)
    with torch.no_grad():
        for la in reg.gate_parameters():
            la.fill_(-10)
    assert reg.expected_flops() < 0.001 * dense
    assert reg.expected_flops(torch.randn(1, 3, 24, 24)) > reg.expected_flops(
        torch.randn(1, 3, 12, 12)
    )


class Mixer(nn.Module):
    """A layer type the gate planner does not know: a matrix used through ``@``."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        return x @ self.mix.t()


def test_an_unknown_layer_type_is_gated_on_its_weight_with_a_warning():
    model = nn.Sequential(nn.Linear(5, 4), Mixer())
    with pytest.warns(UserWarning, match=r"^l0core: Mixer \(1\.mix\) .* on the weight") as seen:
        reg = L0Regularizer(model, 0.0, granularity="output")
    assert len(seen) == 1 and "\n" not in str(seen[0].message)
    with torch.no_grad():
        for la in reg.gate_parameters():
            la.fill_(10.0)
        site = next(s for s in reg._wsites if s.name == "1.mix")
        reg.weight_log_alpha[site.offset] = -10.0  # one closed row of mix
    reg.eval()
    x = torch.randn(3, 5)
    with torch.no_grad():
        out = reg(x)
        assert torch.equal(out[:, 0], torch.zeros(3)) and out[:, 1:].abs().sum() > 0
        torch.testing.assert_close(out, reg.prune().model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L0Regularizer(model, 0.0)  # weight gates suit any parameter: no warning


def test_the_penalty_follows_the_logits_after_the_forward_that_drew_the_gates():
    """A training forward computes the weight gates' P(z != 0) with their draw, and the penalty
    of that step reuses it; once the logits change (an optimizer step, any in-place write), the
    penalty is that of the new logits, with the same gradient as computed from scratch."""
    torch.manual_seed(0)
    reg = L0Regularizer(mlp((40, 200, 10)), 1.0)  # 8,000 + 2,000 weight gates
    opt = torch.optim.SGD(reg.gate_parameters(), lr=5.0)
    x = torch.randn(8, 40)

    def from_scratch() -> tuple[float, torch.Tensor]:
        la = reg.weight_log_alpha.detach().clone().requires_grad_()
        count = prob_nonzero(la, HardConcrete()).sum()
        count.backward()
        return float(count), la.grad

    for _ in range(2):
        reg(x)
        count, grad = from_scratch()
        assert float(reg.count_l0()) == pytest.approx(count, rel=1e-5)
        opt.zero_grad()
        reg.regularization().backward()
        assert torch.allclose(reg.weight_log_alpha.grad, grad, atol=1e-7)
        opt.step()  # the logits move: the next count must see them, forward or not
        count, _ = from_scratch()
        assert float(reg.count_l0()) == pytest.approx(count, rel=1e-5)
    with torch.no_grad():
        reg.weight_log_alpha.add_(-3.0)
    assert float(reg.count_l0()) == pytest.approx(from_scratch()[0], rel=1e-5)


class _ClassMLP(nn.Module):
    def __init__(self, chain: nn.Sequential):
        super().__init__()
        self.a, self.b, self.c = chain[1], chain[3], chain[5]

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x.flatten(1))))))


def test_output_gates_of_a_chain_leave_its_output_units_alone_as_in_a_graph():
    """The classifier's units are what the model returns: an ``nn.Sequential`` MLP gets output
    gates on its hidden units only, like the same layers written as a module class (planned
    through the data flow); ``check_export(ungated=True)`` says why, and the shrunk model keeps
    its ten outputs."""
    torch.manual_seed(0)
    chain = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 10)
    )
    seq = L0Regularizer(chain, 0.1, granularity="output")
    cls = L0Regularizer(_ClassMLP(copy.deepcopy(chain)), 0.1, granularity="output")
    assert seq.n_gated == 12 * 9 + 9 * 7  # the hidden layers' weights (before: and 7 * 10)
    assert sum(s.n_gates for s in seq._asites) == sum(s.n_gates for s in cls._asites) == 9 + 7
    assert "5.weight: not gated: its units are the model's outputs" in seq.check_export(
        ungated=True
    )
    assert any(line.startswith("c.weight: not gated") for line in cls.check_export(ungated=True))
    with torch.no_grad():
        seq.unit_log_alpha.fill_(-10.0)  # every hidden unit closed
    seq.eval()
    small = seq.prune(shrink=True).model
    x = torch.randn(4, 12)
    assert small(x).shape == (4, 10) and torch.allclose(small(x), seq(x), atol=1e-6)
