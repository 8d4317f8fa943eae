"""``GET /healthz`` probes Ray for real: a Ray head that goes down is seen at the next probe."""

from __future__ import annotations

import shutil
import tempfile

from service.stack import free_port, start_ray_head


def test_healthz_sees_ray_go_down(make_api, tmp_path) -> None:
    temp_dir = tempfile.mkdtemp(prefix="l0t-ray-")
    process, url = start_ray_head(
        tmp_path, num_cpus=1, dashboard_port=free_port(), temp_dir=temp_dir
    )
    try:
        # no reconciliation: nothing but the probe itself may talk to Ray
        with make_api(ray_address=url, reconcile_interval_s=3600, backend_timeout_s=2) as api:
            for _ in range(2):  # the second probe is the one a cached client answered alone
                health = api.get("/healthz")
                assert health.status_code == 200 and health.json()["ray"]["ok"], health.text
            process.stop()
            health = api.get("/healthz")
            assert health.status_code == 503, health.text
            ray = health.json()["ray"]
            assert not ray["ok"] and url in ray["detail"]
            assert health.json()["mlflow"]["ok"]
    finally:
        process.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
