"""A spec larger than MLflow's tag limit (8000 characters) is stored whole and read back whole."""

from __future__ import annotations

import hashlib
import json

from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from sweeps import tracking
from sweeps.spec import SweepSpec
from tests.service.conftest import TINY_SPEC


def test_a_spec_over_the_tag_limit_keeps_its_objectives_and_its_front(
    make_api, mlflow_uri, mlflow_client
) -> None:
    lams = [(i + 1) * 1.2345678912345678e-07 for i in range(350)]  # 350 trials, under the limit
    spec = SweepSpec.model_validate(
        {**TINY_SPEC, "name": "big-spec", "regularizer": {"kind": "l0", "lam": {"grid": lams}}}
    )
    assert len(spec.model_dump_json()) > MAX_TAG_VAL_LENGTH and spec.num_trials() == 350
    # recorded as `l0sweep run` records it (the service's POST goes through the same function),
    # with one trial reporting, as while the sweep runs
    sweep_id = tracking.create_sweep_run(spec, mlflow_uri)
    tracking.set_sweep_status(sweep_id, "RUNNING", tracking_uri=mlflow_uri)
    run_id = tracking.start_trial_run(sweep_id, "big_00000", {"seed": 0}, mlflow_uri)
    tracking.log_epoch(run_id, {"epoch": 1, "val_accuracy": 0.5, "sparsity": 0.2}, 1, mlflow_uri)
    objectives = [{"metric": "val_accuracy", "mode": "max"}, {"metric": "sparsity", "mode": "max"}]
    try:
        with make_api() as api:
            sweep = api.get(f"/sweeps/{sweep_id}").json()
            assert sweep["objectives"] == objectives and sweep["progress"]["total"] == 350
            pareto = api.get(f"/sweeps/{sweep_id}/pareto")
            assert pareto.status_code == 200, pareto.text
            assert [t["run_id"] for t in pareto.json()["front"]] == [run_id]
            assert api.get("/sweeps", params={"limit": 5}).status_code == 200
        assert tracking.load_sweep_spec(sweep_id, mlflow_uri) == spec  # whole, from spec.json
        tags = mlflow_client.get_run(sweep_id).data.tags
        assert tags["l0sweep.spec_sha256"] == tracking.spec_digest(spec)
    finally:
        tracking.set_sweep_status(sweep_id, "CANCELLED", tracking_uri=mlflow_uri)


def test_a_spec_artifact_that_does_not_match_its_digest_is_refused(mlflow_uri, mlflow_client):
    spec = SweepSpec.model_validate({**TINY_SPEC, "name": "tampered"})
    sweep_id = tracking.create_sweep_run(spec, mlflow_uri)
    mlflow_client.set_tag(sweep_id, "l0sweep.spec_sha256", "0" * 64)
    try:
        tracking.load_sweep_spec(sweep_id, mlflow_uri)
    except ValueError as err:
        assert "does not match its digest" in str(err)
    else:
        raise AssertionError("a spec that does not match its digest was accepted")
    finally:
        tracking.set_sweep_status(sweep_id, "CANCELLED", tracking_uri=mlflow_uri)


def test_a_spec_recorded_before_a_field_was_added_reads_back(mlflow_uri, mlflow_client):
    """A sweep recorded by an older l0sweep (its spec.json lacks a field added since, with a
    default) still loads: the digest covers what was written, not today's re-dump of it."""
    spec = SweepSpec.model_validate({**TINY_SPEC, "name": "older-spec"})
    sweep_id = tracking.create_sweep_run(spec, mlflow_uri)
    older = spec.model_dump(mode="json")
    del older["dataset"]["augment"]  # added to the dataset spec later; its default is None
    mlflow_client.log_dict(sweep_id, older, tracking.SPEC_ARTIFACT)
    canonical = json.dumps(older, sort_keys=True, separators=(",", ":"))  # as it was recorded
    mlflow_client.set_tag(
        sweep_id, "l0sweep.spec_sha256", hashlib.sha256(canonical.encode()).hexdigest()
    )
    try:
        assert tracking.load_sweep_spec(sweep_id, mlflow_uri) == spec
    finally:
        tracking.set_sweep_status(sweep_id, "CANCELLED", tracking_uri=mlflow_uri)
