"""The Ray auth token a head needs (``service.stack.ensure_ray_token``): created once on a fresh
machine, then found where Ray looks for it without starting Ray's CLI again (a second of CPU at
every start of a Ray head: `l0sweep serve`, each test's own head)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from service import stack


@pytest.fixture
def cli_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The commands ``ensure_ray_token`` runs; each writes a token where Ray's CLI would."""
    calls: list[list[str]] = []

    def run(argv, **kwargs):
        calls.append(argv)
        token = Path.home() / ".ray" / "auth_token"
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text("generated")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(stack.subprocess, "run", run)
    return calls


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    return tmp_path


def test_a_fresh_machine_gets_a_token_once(home: Path, cli_calls: list) -> None:
    stack.ensure_ray_token()
    stack.ensure_ray_token()
    assert [argv[1:] for argv in cli_calls] == [["get-auth-token", "--generate"]]
    assert (home / ".ray" / "auth_token").read_text() == "generated"


@pytest.mark.parametrize("where", ["variable", "path variable", "default file"])
def test_a_token_ray_finds_is_kept_without_the_cli(
    home: Path, cli_calls: list, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    if where == "variable":
        monkeypatch.setenv("RAY_AUTH_TOKEN", "from-the-environment")
    elif where == "path variable":
        (home / "token").write_text("from-a-file\n")
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(home / "token"))
    else:
        (home / ".ray").mkdir()
        (home / ".ray" / "auth_token").write_text("from-the-default-file")
    stack.ensure_ray_token()
    assert cli_calls == []


@pytest.mark.parametrize("content", ["", " \n"])
def test_an_empty_token_file_is_not_a_token(home: Path, cli_calls: list, content: str) -> None:
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(content)
    stack.ensure_ray_token()
    assert len(cli_calls) == 1
