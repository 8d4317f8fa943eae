"""sweeps.latency and sweeps.onnx_export: measured speed, sizes, the ONNX export and its check."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from sweeps.latency import Speed, compare, measure, model_bytes, speedups, timed_batches
from sweeps.onnx_export import export_onnx


def _mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@pytest.fixture
def example() -> torch.Tensor:
    return torch.randn(8, 64, generator=torch.Generator().manual_seed(0))


def test_model_bytes_counts_dense_and_sparse_storage() -> None:
    dense = nn.Linear(10, 4)  # 40 + 4 float32
    assert model_bytes(dense) == 44 * 4
    tied = nn.Sequential(dense, dense)  # shared parameters count once
    assert model_bytes(tied) == 44 * 4
    sparse = nn.Module()
    w = torch.zeros(4, 10)
    w[0, 3] = w[2, 7] = 1.0
    sparse.register_buffer("w", w.to_sparse_csr())
    # 2 values (float32), 5 row pointers and 2 column indices (int64)
    assert model_bytes(sparse) == 2 * 4 + 5 * 8 + 2 * 8


def test_timed_batches_repeat_real_inputs_to_the_batch(example: torch.Tensor) -> None:
    one, big = timed_batches(example, 20)
    assert one.shape == (1, 64) and big.shape == (20, 64)
    assert torch.equal(big[8:16], example) and torch.equal(one[0], example[0])
    with pytest.raises(ValueError, match="non-empty batch"):
        timed_batches(torch.randn(64))


def test_compare_is_side_by_side_and_a_much_smaller_model_is_faster(example) -> None:
    big, small = _mlp(64, 1024, 1024, 10), _mlp(64, 8, 10)
    speeds = compare({"dense": big, "small": small}, example, "cpu", threads=1, rounds=3)
    assert set(speeds) == {"dense", "small"}
    for s in speeds.values():
        assert s.device == "cpu" and s.threads == 1 and s.batch == 256
        assert s.latency_ms_b1 > 0 and s.throughput > 0
    ratios = speedups(speeds, "dense")
    assert ratios["dense"] == {"speedup_vs_dense": 1.0, "latency_speedup_b1": 1.0}
    # ~1000x fewer multiply-adds: a ratio from one interleaved run, with a wide margin.
    assert ratios["small"]["speedup_vs_dense"] > 3


def test_measure_restores_the_thread_count_and_rejects_bad_arguments(example) -> None:
    before = torch.get_num_threads()
    speed = measure(_mlp(64, 10), example, threads=1, rounds=1, batch=16)
    assert isinstance(speed, Speed) and speed.batch == 16
    assert set(speed.metrics()) == {"latency_ms_b1", "throughput"}
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="rounds and threads"):
        measure(_mlp(64, 10), example, threads=0)
    with pytest.raises(ValueError, match="at least one model"):
        compare({}, example)
    with pytest.raises(KeyError, match="'dense' not among"):
        speedups({"a": speed}, "dense")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timing_uses_events(example) -> None:
    speed = measure(_mlp(64, 32, 10), example, "cuda", rounds=2)
    assert speed.device.startswith("cuda") and speed.throughput > 0


def test_onnx_export_matches_torch_and_is_timed(tmp_path, example) -> None:
    model = nn.Sequential(_mlp(64, 32, 10), nn.Softmax(dim=1))
    out = export_onnx(model, example, tmp_path / "m.onnx", rounds=2)
    assert out.error is None and out.path is not None and out.path.exists()
    assert out.max_abs_diff is not None and out.max_abs_diff <= 1e-4
    assert out.latency_ms_b1 > 0 and out.throughput > 0
    import onnxruntime as ort

    got = ort.InferenceSession(str(out.path)).run(None, {"input": example[:3].numpy()})[0]
    np.testing.assert_allclose(got, model(example[:3]).detach().numpy(), atol=1e-5)


class _Unexportable(nn.Module):
    """An operator ONNX has no counterpart for (a singular value decomposition)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(x.reshape(len(x), 8, 8))


class _Drifting(nn.Module):
    """Exports fine, but torch's outputs differ from the exported graph's."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * self.calls


def test_a_model_onnx_cannot_export_or_reproduce_says_why(tmp_path, example) -> None:
    failed = export_onnx(_Unexportable(), example, tmp_path / "bad.onnx")
    assert failed.path is None and failed.error.startswith("export failed:")
    assert not (tmp_path / "bad.onnx").exists()
    drifted = export_onnx(_Drifting(), example, tmp_path / "drift.onnx")
    assert drifted.path is None and "differ from torch" in drifted.error
    assert drifted.max_abs_diff > 1e-4 and drifted.metrics() == {
        "onnx_max_abs_diff": drifted.max_abs_diff
    }


def test_csr_export_computes_the_same_function_and_counts_its_real_size(example) -> None:
    from sweeps.sparse_export import CsrLinear, to_csr

    model = _mlp(64, 32, 10)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.1)  # ~90% zeros
    sparse, converted = to_csr(model)
    assert converted == 2 and isinstance(sparse[0], CsrLinear)
    torch.testing.assert_close(sparse(example), model(example), atol=1e-5, rtol=1e-5)
    assert model_bytes(sparse) < model_bytes(model) / 2
    assert to_csr(nn.Sequential(nn.ReLU()))[1] == 0
