"""Tests of l0core.export.shrink: exact, smaller models from the zeros of pruned ones."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from l0core.export import ShrinkError, ShrinkReport, shrink


def _assert_same_function(model: nn.Module, small: nn.Module, x: torch.Tensor, atol=1e-5) -> None:
    model.eval()
    small.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=atol, rtol=0)


def _zero_rows(layer: nn.Module, rows, bias: float | None = None) -> None:
    with torch.no_grad():
        layer.weight[rows] = 0
        if bias is not None:
            layer.bias[rows] = bias


def _zero_cols(layer: nn.Module, cols) -> None:
    with torch.no_grad():
        layer.weight[:, cols] = 0


def _random_bn(bn: nn.Module) -> None:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.Tanh(),
        nn.Linear(100, 10),
    )


def test_mlp_dead_rows_and_columns_are_removed_exactly():
    torch.manual_seed(0)
    model = _mlp().eval()
    r1, c2 = torch.randperm(300)[:200], torch.randperm(300)[:150]
    r2, c3 = torch.randperm(100)[:40], torch.randperm(100)[:50]
    _zero_rows(model[1], r1)  # their biases stay: constants folded into the next bias
    _zero_cols(model[3], c2)
    _zero_rows(model[3], r2)
    _zero_cols(model[5], c3)
    _zero_cols(model[1], torch.arange(100))  # dead input features: the input width stays
    h1 = 300 - len(set(r1.tolist()) | set(c2.tolist()))
    h2 = 100 - len(set(r2.tolist()) | set(c3.tolist()))

    small, report = shrink(model)

    assert report.architecture_before == [784, 300, 100, 10]
    assert report.architecture_after == [784, h1, h2, 10]
    assert report.params_before == sum(p.numel() for p in model.parameters()) == 266_610
    assert report.params_after == 785 * h1 + (h1 + 1) * h2 + (h2 + 1) * 10
    assert report.params_after == sum(p.numel() for p in small.parameters())
    assert report.kept_constant == {}
    assert isinstance(small, nn.Sequential) and small[1].in_features == 784
    _assert_same_function(model, small, torch.randn(32, 1, 28, 28))


def test_dead_row_with_bias_is_folded_into_a_new_bias():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3, bias=False)).eval()
    _zero_rows(model[0], [2], bias=1.5)
    small, report = shrink(model)
    assert report.architecture_after == [5, 3, 3]
    assert small[2].bias is not None
    torch.testing.assert_close(small[2].bias, 1.5 * model[2].weight[:, 2].detach())
    _assert_same_function(model, small, torch.randn(8, 5))


def test_batchnorm_after_linear_carries_constants():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.SiLU(), nn.Linear(8, 2)).eval()
    _random_bn(model[1])
    _zero_rows(model[0], [0, 3])
    with torch.no_grad():
        model[1].weight[5] = 0  # zero scale: the channel is its BatchNorm bias
    small, report = shrink(model)
    assert report.architecture_after == [6, 5, 2]
    assert small[1].num_features == 5 and small[1].running_mean.shape == (5,)
    _assert_same_function(model, small, torch.randn(16, 6))


def test_backward_cascade_removes_units_read_only_by_removed_units():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    _zero_cols(model[4], [1])  # unit 1 of the second layer is unused ...
    _zero_cols(model[2], [0])
    with torch.no_grad():
        model[2].weight[1, 0] = 1.0  # ... and is the only reader of unit 0 of the first layer
    small, report = shrink(model)
    assert report.architecture_after == [4, 5, 4, 2]
    _assert_same_function(model, small, torch.randn(8, 4))


def _cnn(padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=padding),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(16 * (3 if padding else 2) ** 2, 10),
    )


def test_cnn_dead_channels_are_removed_through_batchnorm_pool_and_flatten():
    torch.manual_seed(4)
    model = _cnn(padding=0).eval()
    _random_bn(model[1])
    _random_bn(model[5])
    _zero_rows(model[0], [1, 2])  # dead conv rows, bias kept: constants folded into conv2
    with torch.no_grad():
        model[1].weight[4] = model[1].bias[4] = 0  # a gated-out BatchNorm channel
        model[5].weight[5] = model[5].bias[5] = 0
    _zero_rows(model[4], [0, 3])
    _zero_cols(model[10], slice(4 * 7, 4 * 8))  # channel 7's flattened block is unread
    small, report = shrink(model)
    assert report.architecture_before == [3, 8, 16, 10]
    assert report.architecture_after == [3, 5, 12, 10]
    assert small[10].in_features == 12 * 4 and small[5].num_features == 12
    assert report.kept_constant == {}
    _assert_same_function(model, small, torch.randn(4, 3, 16, 16))


def test_nonzero_constant_feeding_a_padded_conv_is_kept_and_reported():
    torch.manual_seed(5)
    model = _cnn(padding=1).eval()
    _random_bn(model[1])
    _random_bn(model[5])
    with torch.no_grad():
        model[1].weight[:3] = 0  # constant channels = their BatchNorm bias, then ReLU
        model[1].bias[:3] = torch.tensor([2.0, -1.0, 0.0])  # only channel 0 stays non-zero
    small, report = shrink(model)
    assert report.architecture_after == [3, 6, 16, 10]
    assert report.kept_constant == {"0": 1}
    assert "dead units kept: 0: 1" in str(report)
    _assert_same_function(model, small, torch.randn(4, 3, 16, 16))


def test_padded_average_pool_makes_a_constant_unfoldable():
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3),
        nn.AvgPool1d(2, padding=1),  # border windows average the constant with padding zeros
        nn.Conv1d(4, 3, 3),
        nn.Flatten(),
        nn.Linear(3 * 3, 2),
    ).eval()
    _zero_rows(model[0], [0, 1], bias=0.0)
    with torch.no_grad():
        model[0].bias[0] = 1.0
    small, report = shrink(model)
    assert report.architecture_after == [2, 3, 3, 2]
    assert report.kept_constant == {"0": 1}
    _assert_same_function(model, small, torch.randn(5, 2, 10))


def test_a_layer_is_never_emptied():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    _zero_rows(model[0], slice(None))
    small, report = shrink(model)
    assert report.architecture_after == [3, 1, 2]
    assert report.kept_constant == {"0": 1}
    _assert_same_function(model, small, torch.randn(6, 3))


class LeNet5Caffe(nn.Module):
    """LeNet-5-Caffe as in the L0 paper, written with functional ops."""

    def __init__(self, view: str = "size") -> None:
        super().__init__()
        self.view = view
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        if self.view == "size":
            x = x.view(x.size(0), -1)
        elif self.view == "fixed":
            x = x.view(-1, 800)
        else:
            x = x.flatten(1)
        x = F.dropout(x, 0.5, training=self.training)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


@pytest.mark.parametrize("view", ["size", "fixed", "flatten"])
def test_fx_traceable_lenet_shrinks(view):
    torch.manual_seed(8)
    model = LeNet5Caffe(view).eval()
    _zero_rows(model.conv1, torch.arange(8))
    _zero_rows(model.conv2, torch.arange(20))
    _zero_cols(model.fc1, slice(16 * 45, 16 * 50))  # channels 45..49 are unread
    _zero_rows(model.fc1, torch.arange(100, 500))
    small, report = shrink(model)
    assert report.architecture_before == [1, 20, 50, 500, 10]
    assert report.architecture_after == [1, 12, 25, 100, 10]
    assert isinstance(small, fx.GraphModule) and small.fc1.in_features == 25 * 16
    assert str(report).startswith("1-20-50-500-10 -> 1-12-25-100-10, 431,080 -> ")
    _assert_same_function(model, small, torch.randn(4, 1, 28, 28))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(F.relu(h)) + h


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


@pytest.mark.parametrize(
    ("model", "names"),
    [
        (Residual(), "fc1"),
        (Recurrent(), "lstm"),
        (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1)), "groups=2"),
        (nn.Sequential(nn.Conv2d(4, 4, 3), nn.Linear(4, 2)), "needs a flatten"),
        (nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1), nn.Linear(4, 2)), "1 (Softmax)"),
    ],
)
def test_unsupported_topologies_raise_a_clear_error(model, names):
    with pytest.raises(ShrinkError, match=r"prune\(\) without shrink") as info:
        shrink(model)
    assert names in str(info.value)
    assert isinstance(info.value, ValueError)


def test_results_pickle_save_and_deepcopy():
    torch.manual_seed(9)
    seq = _mlp().eval()
    _zero_rows(seq[3], torch.arange(50))
    lenet = LeNet5Caffe("fixed").eval()
    _zero_rows(lenet.conv2, torch.arange(10))
    for model, x in [(seq, torch.randn(2, 1, 28, 28)), (lenet, torch.randn(2, 1, 28, 28))]:
        small, _ = shrink(model)
        buffer = io.BytesIO()
        torch.save(small, buffer)
        buffer.seek(0)
        copies = [
            pickle.loads(pickle.dumps(small)),
            copy.deepcopy(small),
            torch.load(buffer, weights_only=False),
        ]
        for other in copies:
            _assert_same_function(model, other, x)


def test_input_model_is_unchanged_and_flags_are_kept():
    torch.manual_seed(10)
    model = _cnn(padding=0).train()
    _random_bn(model[1])
    _zero_rows(model[0], [1, 2], bias=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, _ = shrink(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and small.training
    assert small[0].weight.requires_grad


def test_float64_models_stay_float64():
    torch.manual_seed(11)
    model = _cnn(padding=0).double().eval()
    _random_bn(model[1])
    _zero_rows(model[0], [0, 5], bias=0.25)
    small, report = shrink(model)
    assert report.architecture_after == [3, 6, 16, 10]
    assert all(p.dtype == torch.float64 for p in small.parameters())
    assert all(b.dtype in (torch.float64, torch.long) for b in small.buffers())
    _assert_same_function(model, small, torch.randn(3, 3, 16, 16, dtype=torch.float64), 1e-12)


def test_report_string():
    report = ShrinkReport([784, 300, 100, 10], [784, 41, 17, 10], 266_610, 35_011, {})
    assert str(report) == "784-300-100-10 -> 784-41-17-10, 266,610 -> 35,011 parameters"


class _FixedView(nn.Module):
    """A view to a hard-coded feature count, inside an ``nn.Sequential``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features

    def forward(self, x):
        return x.view(-1, self.features)


def test_sequential_with_a_hard_coded_view_shrinks_to_a_model_that_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), _FixedView(4 * 6 * 6), nn.Linear(144, 3))
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].bias[1] = 0.0
    x = torch.randn(2, 3, 8, 8)
    small, report = shrink(model.eval())
    assert report.architecture_after == [3, 3, 3]
    assert torch.allclose(small(x), model(x), atol=1e-6)
