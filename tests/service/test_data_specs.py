"""Specs naming image data that is not usable get a 422 from POST /sweeps naming the path and the
problem, and nothing is created: the files are checked as the spec is validated, not in a trial.
``l0sweep run`` checks them in this machine's data directory; ``l0sweep submit`` leaves that to
the service, whose data directory the sweep uses."""

from __future__ import annotations

import copy

import pytest
import yaml

from service.cli import main as cli
from service.stack import free_port
from tests.service.conftest import TINY_SPEC, count_sweep_runs
from tests.sweeps.images_on_disk import write_cifar10, write_class_folder


@pytest.mark.integration
def test_unusable_image_data_gets_422_naming_path_and_problem(
    make_api, mlflow_client, tmp_path
) -> None:
    """The service checks them in its own data directory (its settings, read at start-up)."""
    data = tmp_path / "data"
    write_class_folder(data / "pets", {"cat": 2})
    (data / "pets" / "dog").mkdir()
    write_class_folder(data / "mixed", {"cat": 1}, size=(8, 8))
    write_class_folder(data / "mixed", {"dog": 1}, size=(9, 8))
    (write_cifar10(data) / "test_batch").unlink()
    (data / "escape").symlink_to(tmp_path)
    cases = [
        ({"name": "image-folder", "params": {"path": "pets"}}, "class folder 'dog' has no images"),
        ({"name": "image-folder", "params": {"path": "mixed"}}, "images of different sizes"),
        ({"name": "image-folder", "params": {"path": "../pets"}}, "must not contain '..'"),
        ({"name": "image-folder", "params": {"path": "escape"}}, "outside the data directory"),
        ({"name": "cifar10"}, "'cifar-10-batches-py'"),
    ]
    before = count_sweep_runs(mlflow_client)
    with make_api(data_dir=data) as api:
        for dataset, problem in cases:
            spec = copy.deepcopy(TINY_SPEC)
            spec["dataset"] = dataset
            response = api.post("/sweeps", json=spec)
            assert response.status_code == 422, response.text
            (detail,) = response.json()["detail"]
            assert detail["field"] == f"dataset.{dataset['name']}", detail
            assert problem in detail["msg"], detail
            name = dataset.get("params", {"path": "cifar"})["path"].split("/")[-1]
            assert name in detail["msg"]
    assert count_sweep_runs(mlflow_client) == before


def test_the_cli_checks_data_for_run_and_leaves_it_to_the_service_for_submit(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("L0SWEEP_DATA_DIR", str(tmp_path / "data"))
    spec = {**TINY_SPEC, "dataset": {"name": "cifar10", "params": {"path": "cifar"}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert cli(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cifar10 folder 'cifar'" in err and "does not exist" in err
    nobody = f"http://127.0.0.1:{free_port()}"
    assert cli(["--url", nobody, "submit", str(path)]) == 2
    assert "cannot reach the service" in capsys.readouterr().err  # not refused locally
