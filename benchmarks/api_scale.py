"""The service with a lab's history in MLflow (issue 18): start-up, refresh cost, idle CPU, load.

    python benchmarks/api_scale.py --home /tmp/h100 --populate 100 50   # write it first
    python benchmarks/api_scale.py --home /tmp/h100                     # again, same history

``--home`` holds the MLflow store (``mlflow.db``, ``artifacts/``); ``--populate N M`` writes N
finished sweeps of M trials into it first (`populate_history.py`, straight into the store). The
script starts MLflow on that store and a Ray head (for ``/healthz``), adds one active sweep (run
outside the service, as `l0sweep run` on another machine would: a running trial, no driver for
the service to reconcile), then measures:

- the refresh cost, on a `SweepCache` of its own against the same MLflow: the first look, a
  later look (what the service does every ``refresh_interval_s``), the MLflow requests of each,
  and reading the whole index in the background;
- a restart of ``l0sweep serve``: seconds to the first ``/healthz`` 200, then to the first
  ``GET /sweeps`` answered, and to the listing's ``total`` (the index complete);
- idle CPU of the API and MLflow processes (their children included) over ``--idle`` seconds
  without requests, from /proc, 20 s after the index is complete (the refresh interval has
  backed off to its ceiling by then: nothing changes);
- `api_load.py` at ``--clients`` clients on ``GET /sweeps`` and ``GET /sweeps/{id}`` (the newest
  finished sweep and the active one), and the API's RSS after it.

It prints the measurements, one a line. The active sweep is deleted at the end (the history stays as it
was). Targets (1,000 sweeps of 50 trials + 1 active): first list within 2 s of /healthz, p99 <
50 ms and 0 errors, idle CPU < 2% of a core, API RSS < 600 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from mlflow.store.tracking import rest_store

from service.cache import SweepCache
from service.record import SweepStore
from service.stack import free_port, start_mlflow, start_ray_head
from sweeps import tracking
from sweeps.spec import SweepSpec

HERE = Path(__file__).resolve().parent
ACTIVE_SPEC = {
    "name": "api-scale-active",
    "experiment": "l0sweep-history",
    "model": {"name": "mlp", "params": {"hidden": [32]}},
    "dataset": {"name": "digits"},
    "regularizer": {"kind": "l0", "lam": {"grid": [0.01, 0.1]}},
    "train": {"epochs": 5, "batch_size": 64},
}
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and all its live descendants (from /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
            times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _TICKS
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier += children
    return sum(times.get(p, 0.0) for p in tree)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Calls:
    """Counts this process's requests to MLflow (wraps the REST store's ``call_endpoint``)."""

    def __init__(self) -> None:
        self.count = 0
        self._real = rest_store.call_endpoint

    def __enter__(self) -> Calls:
        def counted(*args, **kwargs):
            self.count += 1
            return self._real(*args, **kwargs)

        rest_store.call_endpoint = counted
        return self

    def __exit__(self, *exc) -> None:
        rest_store.call_endpoint = self._real


def refresh_cost(uri: str) -> dict[str, str]:
    cache = SweepCache(SweepStore(uri))
    out = {}
    for label in ("first look", "later look"):
        with Calls() as calls:
            started = time.perf_counter()
            cache.refresh()
            out[label] = f"{time.perf_counter() - started:.2f} s, {calls.count} calls"
    with Calls() as calls:
        started = time.perf_counter()
        cache.page(None, None, 50, 0)
        out["first page from MLflow"] = (
            f"{time.perf_counter() - started:.2f} s, {calls.count} calls"
        )
    with Calls() as calls:
        started = time.perf_counter()
        while not cache.warm_step():
            pass
        out["index read"] = f"{time.perf_counter() - started:.1f} s, {calls.count} calls"
    out["sweeps held"] = str(cache.held())
    return out


def populate(uri: str, home: Path, sweeps: int, trials: int, first: int, epochs: int) -> None:
    """`populate_history.py` in two processes (the runs straight into the store), one per core."""
    half = sweeps // 2
    common = ["--tracking-uri", uri, "--direct-store", f"sqlite:///{home / 'mlflow.db'}",
              "--epochs", str(epochs), "--workers", "2"]  # fmt: skip
    script = str(HERE / "populate_history.py")
    parts = [(first, half), (first + half, sweeps - half)]
    argvs = [[sys.executable, script, str(n), str(trials), "--first", str(i), *common]
             for i, n in parts if n]  # fmt: skip
    writers = [subprocess.Popen(argv) for argv in argvs]
    if any(w.wait() != 0 for w in writers):
        raise RuntimeError("populate_history.py failed")


def add_active_sweep(uri: str) -> str:
    sweep_id = tracking.create_sweep_run(SweepSpec.model_validate(ACTIVE_SPEC), uri)
    tracking.set_sweep_status(sweep_id, "RUNNING", tracking_uri=uri)
    done = tracking.start_trial_run(sweep_id, "active_00000", {"lam": 0.01}, uri)
    tracking.log_epoch(done, {"val_accuracy": 0.9, "sparsity": 0.5, "epoch": 5}, 5, uri)
    tracking.end_trial_run(done, "FINISHED", tracking_uri=uri)
    running = tracking.start_trial_run(sweep_id, "active_00001", {"lam": 0.1}, uri)
    tracking.log_epoch(running, {"val_accuracy": 0.8, "sparsity": 0.7, "epoch": 2}, 2, uri)
    return sweep_id


def restart(url_port: int, ray: str, uri: str, log: Path) -> tuple[subprocess.Popen, dict]:
    """Start ``l0sweep serve``; time its first /healthz, first /sweeps, and complete index."""
    argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(url_port),
            "--ray-address", ray, "--mlflow-uri", uri]  # fmt: skip
    env = {**os.environ, "L0SWEEP_STORAGE_PATH": str(log.parent / "ray_results")}
    url = f"http://127.0.0.1:{url_port}"
    with open(log, "ab") as out:
        api = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    started = time.perf_counter()
    with httpx.Client(timeout=120) as http:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if http.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            if api.poll() is not None:
                raise RuntimeError(f"the API exited; see {log}")
            time.sleep(0.05)
        healthy = time.perf_counter()
        first = http.get(f"{url}/sweeps")
        listed = time.perf_counter()
        first.raise_for_status()
        cold_total = first.json()["total"]
        while http.get(f"{url}/sweeps").json()["total"] is None:
            time.sleep(0.1)
        complete = time.perf_counter()
    return api, {
        "healthz after start": f"{healthy - started:.1f} s",
        "first /sweeps after healthz": f"{listed - healthy:.2f} s (total {cold_total})",
        "index complete after healthz": f"{complete - healthy:.1f} s",
    }


def idle_cpu(pids: list[int], seconds: float) -> str:
    before = [cpu_seconds(p) for p in pids]
    time.sleep(seconds)
    after = [cpu_seconds(p) for p in pids]
    return " + ".join(f"{100 * (a - b) / seconds:.1f}%" for a, b in zip(after, before, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="the MLflow store's directory")
    parser.add_argument("--populate", nargs=2, type=int, metavar=("N", "M"),
                        help="first write N finished sweeps of M trials into it")  # fmt: skip
    parser.add_argument("--first", type=int, default=0,
                        help="with --populate: the index of the first sweep written (to add to a "
                        "history)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=10,
                        help="with --populate: epochs of metrics per trial")  # fmt: skip
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measured")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    home = args.home.resolve()
    row: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        mlflow, uri = start_mlflow(home, port=free_port())
        stack.callback(mlflow.stop)
        if args.populate:
            populate(uri, home, *args.populate, first=args.first, epochs=args.epochs)
        ray_temp = tempfile.mkdtemp(prefix="l0scale-ray-")
        ray, ray_url = start_ray_head(home / "ray-logs", num_cpus=1, dashboard_port=free_port(),
                                      temp_dir=ray_temp)  # fmt: skip
        stack.callback(ray.stop)
        store = SweepStore(uri)
        active = add_active_sweep(uri)
        stack.callback(store.delete, active)
        stack.callback(tracking.set_sweep_status, active, "CANCELLED", None, uri)
        stack.callback(tracking.close_open_trials, active, "KILLED", uri)
        row.update(refresh_cost(uri))
        port = free_port()
        api, timings = restart(port, ray_url, uri, home / "api.log")
        stack.callback(api.wait, 30)
        stack.callback(api.terminate)
        row.update(timings)
        time.sleep(20)  # past the start-up: the refresh interval has backed off (nothing changes)
        row["idle CPU, API + MLflow"] = idle_cpu([api.pid, mlflow.popen.pid], args.idle)
        newest = httpx.get(f"http://127.0.0.1:{port}/sweeps", params={"status": "FINISHED",
                                                                      "limit": 1}).json()  # fmt: skip
        load = subprocess.run(
            [sys.executable, str(HERE / "api_load.py"), "--url", f"http://127.0.0.1:{port}",
             "--sweep-id", newest["items"][0]["id"], "--sweep-id", active,
             "--clients", str(args.clients), "--duration", str(args.duration)],
            capture_output=True, text=True,
        )  # fmt: skip
        print(load.stdout)
        row["API RSS after the load"] = f"{rss_mb(api.pid):.0f} MB"
        row["load"] = load.stdout.strip().splitlines()[-1] if load.stdout else load.stderr[-500:]
    print(f"history: {home}")
    for key, value in row.items():
        print(f"{key:<32} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
