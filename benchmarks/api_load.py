"""Load on the sweep service's read endpoints while sweeps run (issue 4's speed target).

50 concurrent clients on loopback for about 20 s against ``GET /sweeps/{id}`` (each sweep) and
``GET /sweeps``; prints requests/s, p50, p99 and errors per endpoint, and the machine's load
average before and after (other work on the machine shows there). Target: p99 < 50 ms, zero
errors.

    python benchmarks/api_load.py                       # starts Ray, MLflow, the API and a sweep
    python benchmarks/api_load.py --sweeps 2 --ray-cpus 2   # two sweeps training at once
    python benchmarks/api_load.py --url http://127.0.0.1:8000 --sweep-id ID   # an existing service

Without ``--url`` the script starts the embedded stack in a temporary directory, runs
``l0sweep serve`` as its own process (the load generator must not share the server's event
loop), submits ``--sweeps`` small digits sweeps that keep training through the measurement, then
cancels them and shuts everything down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from service.client import ApiError, Client
from service.settings import Settings
from service.stack import EmbeddedStack, free_port

RUNNING_SPEC = {
    "name": "api-load",
    "experiment": "l0sweep-benchmarks",
    "model": {"name": "mlp", "params": {"hidden": [32]}},
    "dataset": {"name": "digits"},
    "regularizer": {"kind": "l0", "lam": {"grid": [0.01, 0.1]}},
    "train": {"epochs": 150, "batch_size": 16},
    "resources": {"cpus_per_trial": 1},
}


async def _worker(host: str, port: int, requests: list[bytes], paths: list[str], deadline: float,
                  out: list) -> None:  # fmt: skip
    """One client on one keep-alive connection (plain asyncio streams: the generator must cost
    the machine less than the server it measures)."""
    reader, writer = await asyncio.open_connection(host, port)
    i = 0
    try:
        while time.perf_counter() < deadline:
            k = i % len(requests)
            i += 1
            start = time.perf_counter()
            ok = False
            try:
                writer.write(requests[k])
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                ok = head.startswith(b"HTTP/1.1 200")
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
            out.append((paths[k], time.perf_counter() - start, ok))
    finally:
        writer.close()


async def load(base: str, paths: list[str], clients: int, duration_s: float, token: str | None):
    url = urlsplit(base)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    requests = [
        f"GET {p} HTTP/1.1\r\nHost: {url.netloc}\r\n{auth}Accept: application/json\r\n\r\n".encode()
        for p in paths
    ]
    samples: list[tuple[str, float, bool]] = []
    # Warm up: caches filled, the server's first-request costs paid.
    await _worker(url.hostname, url.port, requests, paths, time.perf_counter() + 0.5, [])
    deadline = time.perf_counter() + duration_s
    started = time.perf_counter()
    await asyncio.gather(
        *(
            _worker(url.hostname, url.port, requests, paths, deadline, samples)
            for _ in range(clients)
        )
    )
    return samples, time.perf_counter() - started


def report(samples: list[tuple[str, float, bool]], elapsed: float, clients: int) -> bool:
    print(f"{clients} clients, {elapsed:.1f} s")
    print(
        f"{'endpoint':<44} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
    )
    groups = {"all": samples}
    for path in sorted({p for p, _, _ in samples}):
        groups[path] = [s for s in samples if s[0] == path]
    for name, group in groups.items():
        lat = sorted(x[1] * 1000 for x in group)
        errors = sum(not ok for _, _, ok in group)
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        label = name if len(name) <= 44 else name[:41] + "..."
        print(
            f"{label:<44} {len(group):>9} {len(group) / elapsed:>8.0f} {p50:>8.1f} {p99:>8.1f} {errors:>7}"
        )
    all_lat = sorted(x[1] * 1000 for x in samples)
    p99 = all_lat[min(len(all_lat) - 1, int(0.99 * len(all_lat)))]
    errors = sum(not ok for _, _, ok in samples)
    passed = p99 < 50 and errors == 0
    print(f"target p99 < 50 ms and 0 errors: {'met' if passed else 'NOT met'} (p99 {p99:.1f} ms)")
    return passed


@contextlib.contextmanager
def embedded_service(home: Path, ray_cpus: int) -> Iterator[str]:
    """Ray + MLflow (embedded) and ``l0sweep serve`` in its own process; yields the API URL."""
    ray_temp = tempfile.mkdtemp(prefix="l0load-ray-")  # short: Ray's Unix sockets live there
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, ray_temp, ignore_errors=True)
        ready = cleanup.enter_context(
            EmbeddedStack(Settings(home=home, ray_num_cpus=ray_cpus), ray_temp_dir=ray_temp)
        )
        port = free_port()
        argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                "--ray-address", ready.ray_address, "--mlflow-uri", ready.tracking_uri]  # fmt: skip
        env = {**os.environ, "L0SWEEP_STORAGE_PATH": str(home / "ray_results")}
        with open(home / "api.log", "wb") as log:
            api = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(120):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
            yield url
        finally:
            api.terminate()
            api.wait(30)


def _cancel_quietly(api: Client, sweep_id: str) -> None:
    with contextlib.suppress(ApiError):
        api.cancel(sweep_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running service (default: start one)")
    parser.add_argument(
        "--sweep-id", action="append", help="a sweep to read, repeatable (default: submit them)"
    )
    parser.add_argument(
        "--sweeps", type=int, default=1, help="sweeps to submit and keep running (default 1)"
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument(
        "--ray-cpus",
        type=int,
        default=1,
        help="CPUs of the embedded Ray head, i.e. trials training during the load (default 1: "
        "on a 2-core machine a second CPU-bound trial starves the server and this generator)",
    )
    args = parser.parse_args()
    token = os.environ.get("L0SWEEP_TOKEN")

    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="l0sweep-load-")))
            print(f"starting Ray, MLflow and the API under {home} ...", flush=True)
            url = stack.enter_context(embedded_service(home, args.ray_cpus))
        api = stack.enter_context(Client(url, token=token))
        sweep_ids = args.sweep_id or _submit(api, stack, args.sweeps, args.ray_cpus)
        for sweep_id in sweep_ids:
            sweep = api.get(sweep_id)
            print(
                f"sweep {sweep_id}: {sweep.status}, {sweep.progress.running} trials running",
                flush=True,
            )
        print(f"load average before: {_loadavg()}", flush=True)
        paths = [f"/sweeps/{sweep_id}" for sweep_id in sweep_ids] + ["/sweeps"]
        samples, elapsed = asyncio.run(load(url, paths, args.clients, args.duration, token))
        print(f"load average after:  {_loadavg()}")
        for sweep_id in sweep_ids:
            sweep = api.get(sweep_id)
            print(f"sweep {sweep_id} after the load: {sweep.status}, {sweep.progress}")
        passed = report(samples, elapsed, args.clients)
    return 0 if passed else 1


def _submit(api: Client, stack: contextlib.ExitStack, count: int, ray_cpus: int) -> list[str]:
    """Submit ``count`` sweeps; return once they all train (as far as Ray has CPUs for them).

    Several sweeps get one trial each (a fixed lam), so that each trains on its own CPU instead
    of the first one's two trials taking both.
    """
    sweep_ids = []
    for i in range(count):
        spec = RUNNING_SPEC | {"name": f"api-load-{i}"}
        if count > 1:
            spec["regularizer"] = {"kind": "l0", "lam": 0.01 * 10**i}
        sweep_ids.append(api.submit(spec).id)
        stack.callback(_cancel_quietly, api, sweep_ids[-1])
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        running = [api.get(sweep_id).progress.running for sweep_id in sweep_ids]
        if all(running) if ray_cpus >= count else sum(running) >= ray_cpus:
            break
        time.sleep(1)
    return sweep_ids


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" ({os.cpu_count()} CPUs)"


if __name__ == "__main__":
    raise SystemExit(main())
