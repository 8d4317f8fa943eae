import subprocess
import sys

import numpy as np
import pytest
import torch

from sweeps.config import DataPathError, resolve_data_path
from sweeps.data import load_dataset
from sweeps.registry import MODELS, UnknownNameError, list_datasets, list_models
from sweeps.spec import SweepSpec, TrialConfig
from sweeps.training import TrialDiverged, architecture, train
from tests.sweeps.conftest import tiny_spec


def test_registries_list_entries_with_schemas():
    models = {m["name"]: m for m in list_models()}
    assert {"mlp", "lenet5", "cnn"} <= set(models)
    assert "hidden" in models["mlp"]["params"]["properties"]
    assert {"fashion-mnist", "mnist", "digits", "mnist1d", "sparse-teacher", "npz"} <= {
        d["name"] for d in list_datasets()
    }
    # sorted names, with whatever test plugins (test_plugin's lab-*) registered in this process
    with pytest.raises(
        UnknownNameError, match=r"registered: cnn, googlenet, ([\w-]+, )*lenet5, mlp, "
    ):
        MODELS.get("resnet1000")


def test_models_build_for_their_inputs():
    for name, shape in [("mlp", (784,)), ("lenet5", (1, 28, 28)), ("cnn", (3, 32, 32))]:
        entry = MODELS.get(name)
        model = entry.factory(entry.params(), shape, 10)
        assert isinstance(model, torch.nn.Sequential)
        assert model(torch.zeros(2, *shape)).shape == (2, 10)
    assert (
        architecture(MODELS.get("mlp").factory(MODELS.get("mlp").params(), (1, 28, 28), 10))
        == "784-300-100-10"
    )
    with pytest.raises(ValueError, match="image inputs"):
        MODELS.get("lenet5").factory(MODELS.get("lenet5").params(), (40,), 10)


def test_splits_are_seeded_and_disjoint():
    a = load_dataset("sparse-teacher", {"num_samples": 500}, 0.2, 0.2, split_seed=1)
    b = load_dataset("sparse-teacher", {"num_samples": 500}, 0.2, 0.2, split_seed=1)
    assert torch.equal(a.val[0], b.val[0])
    assert len(a.train[0]) + len(a.val[0]) + len(a.test[0]) == 500
    assert 0.0 < a.info["teacher_density"] < 0.2


def test_digits_are_scikit_learns_read_without_importing_it(tmp_path):
    """The digits loader reads the file scikit-learn ships: the same images and labels as
    ``load_digits``, and the process that loads them does not import scikit-learn (a second of
    CPU in every trial and driver)."""
    code = (
        "import sys, numpy as np; from sweeps.registry import DATASETS; import sweeps.data; "
        "raw = DATASETS.get('digits').factory(None); "
        "assert not any(m == 'sklearn' or m.startswith('sklearn.') for m in sys.modules), "
        "sorted(m for m in sys.modules if m.startswith('sklearn')); "
        "np.save(sys.argv[1], raw.x); np.save(sys.argv[2], raw.y)"
    )
    x_path, y_path = tmp_path / "x.npy", tmp_path / "y.npy"
    subprocess.run([sys.executable, "-c", code, str(x_path), str(y_path)], check=True)
    x, y = np.load(x_path), np.load(y_path)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    assert x.shape == (1797, 1, 8, 8) and np.array_equal(x, bunch.images[:, None] / 16.0)
    assert np.array_equal(y, bunch.target) and y.dtype == np.int64


def test_npz_paths_stay_inside_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("L0SWEEP_DATA_DIR", str(tmp_path))
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "toy.npz", x=rng.normal(size=(60, 5)).astype("float32"), y=rng.integers(0, 3, 60)
    )
    d = load_dataset("npz", {"path": "toy.npz"})
    assert d.input_shape == (5,) and d.num_classes == 3
    (tmp_path / "escape").symlink_to("/etc")
    for bad in ("/etc/passwd", "../x.npz", "escape/passwd"):
        with pytest.raises(DataPathError):
            resolve_data_path(bad)


def _cfg(**overrides):
    d = SweepSpec.model_validate(tiny_spec(**overrides)).model_dump(mode="json")
    return TrialConfig.of(
        {**{k: d[k] for k in ("model", "dataset", "regularizer", "train")}, "seed": 0}
    )


def test_training_is_reproducible_and_reports_every_metric():
    from sweeps.spec import EPOCH_METRICS, FINAL_METRICS

    seen = []
    a = train(_cfg(), on_epoch=lambda m, s: seen.append(m))
    b = train(_cfg())
    assert set(EPOCH_METRICS) <= set(seen[0]) and set(EPOCH_METRICS) | set(FINAL_METRICS) <= set(
        a.metrics
    )
    assert a.metrics["val_accuracy"] == b.metrics["val_accuracy"]
    assert a.metrics["train_loss"] == b.metrics["train_loss"]


def test_resume_from_state_matches_uninterrupted_run():
    states = []
    full = train(_cfg(train={"epochs": 3}), on_epoch=lambda m, s: states.append(s()))
    resumed = train(_cfg(train={"epochs": 3}), state=states[0])
    assert resumed.metrics["train_loss"] == pytest.approx(full.metrics["train_loss"], rel=1e-6)


def test_divergence_raises_with_reason():
    with pytest.raises(TrialDiverged, match="epoch 1"):
        train(
            _cfg(
                train={"lr": 1e6, "optimizer": "sgd", "momentum": 0.0}, regularizer={"kind": "none"}
            )
        )
