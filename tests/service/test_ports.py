"""The ports the stack picks for its servers (``service.stack.free_port``).

A port is chosen before the server that gets it binds it. One from the kernel's ephemeral range
(what bind(0) returns) can be taken in between by any process's outgoing connection; the Ray
heads of the suite, seven such ports each, lost one now and then on a busy machine."""

from __future__ import annotations

import random
import socket

from service.stack import ephemeral_port_range, free_port


def test_a_chosen_port_is_free_and_outside_the_range_of_outgoing_connections() -> None:
    low, high = ephemeral_port_range()
    for _ in range(20):
        port = free_port()
        assert not low <= port <= high, (port, (low, high))
        assert port >= 20000, port  # above Ray's worker ports (10002-19999)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_the_preferred_port_is_kept_only_while_nothing_listens_on_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        other = free_port(port)
        assert other != port
    assert free_port(port) == port


def test_two_processes_seeded_alike_pick_different_ports() -> None:
    # pytest-randomly seeds every worker's module RNG alike before each test.
    random.seed(1234)
    first = [free_port() for _ in range(5)]
    random.seed(1234)
    second = [free_port() for _ in range(5)]
    assert first != second
