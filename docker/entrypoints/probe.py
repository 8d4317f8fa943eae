"""Probes for the entrypoints and health checks of the l0sweep image (standard library, plus
psycopg2 for PostgreSQL).

    probe.py tcp HOST PORT        something accepts connections on HOST:PORT
    probe.py http URL             URL answers 2xx (proxies ignored: these are cluster addresses)
    probe.py postgres             the MLflow database (POSTGRES_* variables) accepts our login

Exit status: 0 ready, 1 not ready yet (worth retrying), 3 a fault that retrying cannot fix (wrong
password, missing database), with the reason on stderr.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request

READY, NOT_YET, GIVE_UP = 0, 1, 3
TIMEOUT_S = 3.0


def tcp(host: str, port: str) -> int:
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S):
            return READY
    except OSError:
        return NOT_YET


def http(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_S) as response:
            return READY if 200 <= response.status < 300 else NOT_YET
    except (urllib.error.URLError, OSError, ValueError):
        return NOT_YET


def postgres() -> int:
    import psycopg2

    try:
        psycopg2.connect(
            host=os.environ.get("POSTGRES_HOST", "postgres"),
            port=int(os.environ.get("POSTGRES_PORT", "5432")),
            user=os.environ.get("POSTGRES_USER", "mlflow"),
            password=os.environ["POSTGRES_PASSWORD"],
            dbname=os.environ.get("POSTGRES_DB", "mlflow"),
            connect_timeout=int(TIMEOUT_S),
        ).close()
    except psycopg2.OperationalError as exc:
        reason = str(exc).strip()
        if "password authentication failed" in reason or "does not exist" in reason:
            print(reason, file=sys.stderr)
            return GIVE_UP
        return NOT_YET
    return READY


def main(argv: list[str]) -> int:
    commands = {"tcp": (tcp, 2), "http": (http, 1), "postgres": (postgres, 0)}
    if not argv or argv[0] not in commands or len(argv) - 1 != commands[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    function, _ = commands[argv[0]]
    return function(*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
