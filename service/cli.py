"""``l0sweep``: serve the stack, talk to the service, or run a sweep locally without it.

    l0sweep serve                      Ray + MLflow + API on this machine (Ctrl-C stops all)
    l0sweep submit SPEC [--wait]       POST a YAML/JSON spec; --wait shows live progress
    l0sweep list | status ID | cancel ID | pareto ID | logs ID
    l0sweep run SPEC                   a sweep in this process's Ray, no service, recorded in
                                       the embedded MLflow store that `l0sweep serve` shows
    l0sweep report ID [ID ...]         Markdown tables and plots of sweeps, from MLflow
    l0sweep report --name fashion-mlp  ... of the finished sweeps whose name contains it
    l0sweep schema                     the JSON Schema of a spec

The service URL comes from ``--url`` or ``L0SWEEP_URL``, the token from ``L0SWEEP_TOKEN`` (never
from the command line, where other users' ``ps`` would show it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from service.client import ApiError, Client
from service.schemas import ParetoFront, SweepOut, TrialOut
from sweeps.vocabulary import SweepStatus

__all__ = ["main"]

DEFAULT_URL = "http://127.0.0.1:8000"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``l0sweep`` script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the service at {args.url}: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # unreadable spec, refused bind, unreachable service
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l0sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", default=os.environ.get("L0SWEEP_URL", DEFAULT_URL), help="service URL"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start Ray, MLflow and the API (or join existing ones)")
    serve.add_argument("--host", help="bind address (non-loopback needs L0SWEEP_TOKEN)")
    serve.add_argument("--port", type=int)
    serve.add_argument("--ray-address", help="join this Ray cluster (dashboard URL)")
    serve.add_argument("--mlflow-uri", help="use this MLflow tracking server")
    serve.add_argument("--home", type=Path, help="embedded MLflow store and logs")
    serve.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray head")
    serve.set_defaults(func=_serve)

    submit = sub.add_parser("submit", help="submit a spec (YAML or JSON file)")
    submit.add_argument("spec", type=Path)
    submit.add_argument("--wait", action="store_true", help="follow until the sweep ends")
    submit.add_argument("--idempotency-key", help="resubmitting with the same key is a no-op")
    submit.set_defaults(func=_submit)

    listing = sub.add_parser("list", help="list sweeps")
    listing.add_argument("--status", choices=[s.value for s in SweepStatus])
    listing.add_argument("--name", help="substring of the name")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(func=_list)

    for name, func, text in (
        ("status", _status, "a sweep's status and progress"),
        ("cancel", _cancel, "stop a sweep gracefully"),
        ("pareto", _pareto, "a sweep's Pareto front as a table"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("sweep_id")
        cmd.set_defaults(func=func)

    logs = sub.add_parser("logs", help="the last lines of a sweep driver's log")
    logs.add_argument("sweep_id")
    logs.add_argument("--tail", type=int, default=100)
    logs.set_defaults(func=_logs)

    run = sub.add_parser("run", help="run a sweep locally, without the service")
    run.add_argument("spec", type=Path)
    run.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the embedded store under "
        "L0SWEEP_HOME, the one `l0sweep serve` uses)",
    )
    run.add_argument(
        "--storage-path",
        help="Tune storage path (default: L0SWEEP_STORAGE_PATH or <home>/ray_results)",
    )
    run.set_defaults(func=_run)

    report = sub.add_parser("report", help="Markdown tables and PNG plots of sweeps, from MLflow")
    report.add_argument("sweep_ids", nargs="*", metavar="SWEEP_ID", help="sweeps to compare")
    report.add_argument(
        "--name", help="also every FINISHED sweep whose name contains this (latest of each name)"
    )
    report.add_argument("--out", type=Path, help="output directory (default: ./report-<name>)")
    report.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the service's MLflow)",
    )
    report.set_defaults(func=_report)

    schema = sub.add_parser("schema", help="print the JSON Schema of a sweep spec")
    schema.set_defaults(func=_schema)
    return parser


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, token=os.environ.get("L0SWEEP_TOKEN") or None)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings
    from service.stack import EmbeddedStack
    from sweeps.config import configure_mlflow_client

    overrides = {
        "host": args.host,
        "port": args.port,
        "ray_address": args.ray_address,
        "tracking_uri": args.mlflow_uri,
        "home": args.home,
        "ray_num_cpus": args.num_cpus,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    settings.check_bind()
    # The service answers 503 at once when MLflow cannot serve: a client with no retry window.
    configure_mlflow_client(0.0)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: without a handler of
    # ours the default one would end the process before the stack stops Ray and MLflow.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with EmbeddedStack(settings) as ready:
        app = create_app(ready)
        api = f"http://{ready.host}:{ready.port}"
        print(f"l0sweep API     {api}   (docs: {api}/docs)", flush=True)
        print(f"MLflow UI       {ready.mlflow_ui_base() or ready.tracking_uri}", flush=True)
        print(f"Ray dashboard   {ready.ray_address}", flush=True)
        print(
            "Ctrl-C stops the API"
            + (" and the embedded services" if not (args.ray_address and args.mlflow_uri) else ""),
            flush=True,
        )
        uvicorn.run(app, host=ready.host, port=ready.port, log_level="warning")
    return 0


def _load_spec(path: Path, check_data: bool = False, data_dirs: Any = None) -> dict[str, Any]:
    """The spec file validated locally first, so errors name their fields before any request.

    Args:
        check_data: look for the dataset's files in this machine's data directory (``run``);
            a submitted spec runs against the service's, which checks them itself.
        data_dirs: that directory (`sweeps.config.DataDirs`); default: the settings read now.
    """
    from sweeps.registry import load_builtins
    from sweeps.spec import SweepSpec

    load_builtins()  # the plugins a spec may name; one that fails to import is named
    try:
        spec = SweepSpec.from_file(path, check_data=check_data, data_dirs=data_dirs)
        return spec.model_dump(mode="json")
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors()
        ]
        raise ValueError(f"{path} is not a valid sweep spec:\n" + "\n".join(lines)) from None


def _submit(args: argparse.Namespace) -> int:
    spec = _load_spec(args.spec)
    with _client(args) as api:
        sweep = api.submit(spec, idempotency_key=args.idempotency_key)
        trials = _trials_text(sweep.progress.total, sweep.duplicate_trials)
        print(f"submitted sweep {sweep.id} ({sweep.name}): {trials}")
        if sweep.links.mlflow:
            print(f"  MLflow: {sweep.links.mlflow}")
        if not args.wait:
            return 0
        bar = _ProgressBar()
        final = api.wait(sweep.id, on_update=bar.update)
        bar.close()
        print(f"sweep {final.id} {final.status}" + (f": {final.message}" if final.message else ""))
        if final.status == SweepStatus.FINISHED:
            _print_pareto(api.pareto(final.id))
        return 0 if final.status == SweepStatus.FINISHED else 1


def _list(args: argparse.Namespace) -> int:
    with _client(args) as api:
        page = api.list(status=args.status, name=args.name, limit=args.limit)
    rows = [
        [
            s.id,
            s.name,
            s.status,
            _done(s),
            s.created_at.strftime("%Y-%m-%d %H:%M") if s.created_at else "",
        ]
        for s in page.items
    ]
    _print_table(["id", "name", "status", "done/total", "created (UTC)"], rows)
    if page.next_offset is not None and page.total is not None:
        print(f"... {page.total - len(page.items)} more (--limit)")
    elif page.next_offset is not None:
        print("... more (--limit)")
    return 0


def _status(args: argparse.Namespace) -> int:
    with _client(args) as api:
        sweep = api.get(args.sweep_id)
    p = sweep.progress
    print(
        f"{sweep.name} ({sweep.id}): {sweep.status}"
        + (f" - {sweep.message}" if sweep.message else "")
    )
    print(
        f"  trials: {p.total} total, {p.finished} finished, {p.running} running, "
        f"{p.pending} pending, {p.failed} failed, {p.stopped} stopped"
    )
    if sweep.best:
        print(
            f"  best so far: {_metrics_text(sweep.best.get('metrics', {}))} (trial {sweep.best.get('trial_id')})"
        )
    for label, url in (("MLflow", sweep.links.mlflow), ("Ray job", sweep.links.ray_job)):
        if url:
            print(f"  {label}: {url}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as api:
        sweep = api.cancel(args.sweep_id)
    print(f"cancelling sweep {sweep.id}: its trials stop and its runs end KILLED ({sweep.status})")
    return 0


def _pareto(args: argparse.Namespace) -> int:
    with _client(args) as api:
        _print_pareto(api.pareto(args.sweep_id))
    return 0


def _logs(args: argparse.Namespace) -> int:
    with _client(args) as api:
        print(api.logs(args.sweep_id, tail=args.tail), end="")
    return 0


def _run(args: argparse.Namespace) -> int:
    from service.stack import embedded_mlflow, mlflow_home
    from sweeps import tracking
    from sweeps.config import SweepSettings, configure_mlflow_client, use_settings
    from sweeps.driver import run_sweep
    from sweeps.pareto import pareto_front
    from sweeps.spec import SweepSpec

    settings = SweepSettings()  # read once; in force for the spec's limits and all the run does
    configure_mlflow_client(settings.mlflow_retry_window_s)
    with use_settings(settings):
        loaded = _load_spec(args.spec, check_data=True, data_dirs=settings.data_dirs())
        spec = SweepSpec.model_validate(loaded, context={"data_dirs": settings.data_dirs()})
        print(f"sweep {spec.name}: {_trials_text(spec.num_trials(), spec.duplicate_trials())}")
        tty = sys.stdout.isatty()

        def show(progress) -> None:
            print(("\r" if tty else "") + progress.line(), end="" if tty else "\n", flush=True)

        uri = args.tracking_uri or settings.tracking_uri
        with contextlib.ExitStack() as stack:
            store, ui = None, uri if uri and uri.startswith(("http://", "https://")) else None
            if uri is None:
                store = mlflow_home(settings.home)
                print(f"recording in the MLflow store {store}", flush=True)
                uri, shared = stack.enter_context(embedded_mlflow(store))
                ui = uri if shared else None
            result = run_sweep(spec, uri, args.storage_path, progress=show, settings=settings)
            experiment_id = tracking.client(uri).get_run(result.sweep_id).info.experiment_id
        if tty:
            print()
        print(
            f"sweep {result.sweep_id} {result.status} (Tune experiment at {result.experiment_path})"
        )
        if ui:
            print(
                f"  MLflow: {ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{result.sweep_id}"
            )
        elif store is not None:
            print(f"  MLflow: in {store}; `l0sweep serve` shows it in the MLflow UI")
        objectives = [o.model_dump() for o in spec.objectives]
        front = [TrialOut.of(t) for t in pareto_front(result.trials, objectives)]
        _print_pareto(
            ParetoFront(
                sweep_id=result.sweep_id,
                status=result.status,
                objectives=objectives,
                front=front,
                num_trials=len(result.trials),
            )
        )
        return 0 if result.status == SweepStatus.FINISHED else 1


def _report(args: argparse.Namespace) -> int:
    from sweeps.config import SweepSettings
    from sweeps.results_report import write_report

    if not (args.sweep_ids or args.name):
        raise ValueError("name the sweeps to report: SWEEP_ID ... and/or --name TEXT")
    uri = args.tracking_uri or SweepSettings().tracking_uri
    if uri is None:  # the MLflow server the service records into
        with _client(args) as api:
            uri = api.health().mlflow.url
    if uri is None:
        raise ValueError("no MLflow tracking URI: give --tracking-uri or set MLFLOW_TRACKING_URI")
    out = args.out or Path(f"report-{args.name or args.sweep_ids[0]}")
    path = write_report(args.sweep_ids, out, uri, name_contains=args.name)
    print(f"wrote {path} and {len(list(out.glob('*.png')))} plots (from MLflow at {uri})")
    return 0


def _trials_text(total: int, duplicates: int) -> str:
    """``6 trials (2 duplicates removed: ...)``: what validation made of the spec's expansion."""
    if not duplicates:
        return f"{total} trials"
    return (
        f"{total} trials ({duplicates} duplicate{'s' if duplicates > 1 else ''} removed: equal to "
        "another trial once the fields their method ignores are dropped)"
    )


def _schema(args: argparse.Namespace) -> int:
    from sweeps.registry import load_builtins
    from sweeps.spec import json_schema

    load_builtins()
    print(json.dumps(json_schema(), indent=2))
    return 0


def _done(sweep: SweepOut) -> str:
    p = sweep.progress
    return f"{p.finished + p.failed + p.stopped}/{p.total}"


def _metrics_text(metrics: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


def _print_pareto(front: ParetoFront) -> None:
    names = [o["metric"] for o in front.objectives]
    print(
        f"Pareto front of sweep {front.sweep_id} ({front.status}): {len(front.front)} of {front.num_trials} trials"
    )
    rows = [
        [t.id, *(_fmt(t.metrics.get(n)) for n in names), _fmt(t.metrics.get("test_accuracy"))]
        for t in front.front
    ]
    _print_table(
        [
            "trial",
            *(f"{n} ({o['mode']})" for n, o in zip(names, front.objectives, strict=True)),
            "test_accuracy",
        ],
        rows,
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = (
        [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
        if rows
        else [len(h) for h in header]
    )
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


class _ProgressBar:
    """One live line on a terminal (a line per change otherwise)."""

    def __init__(self, width: int = 30) -> None:
        self.width = width
        self.tty = sys.stdout.isatty()
        self.last = ""

    def update(self, sweep: SweepOut) -> None:
        p = sweep.progress
        done = p.finished + p.failed + p.stopped
        filled = int(self.width * done / p.total) if p.total else 0
        best = _metrics_text(sweep.best["metrics"]) if sweep.best else "-"
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{p.total} done, "
            f"{p.running} running, {p.failed} failed | best {best} | {sweep.status}"
        )
        if line == self.last:
            return
        self.last = line
        if self.tty:
            print("\r" + line, end="", flush=True)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.tty:
            print()


if __name__ == "__main__":
    sys.exit(main())
