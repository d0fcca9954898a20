"""The API token file (STATE_DIR/token) and where the server and the CLI look for a token."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from torpor.apitoken import TokenError, client_token, default_state_dir, given_token, load_or_create
from torpor.cli.main import api_token


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_first_start_generates_a_private_token_and_later_starts_reuse_it(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    old = os.umask(0)  # the most permissive umask: the file must still be 0600
    try:
        tok = load_or_create(state)
    finally:
        os.umask(old)
    path = state / "token"
    assert tok.generated and tok.source == str(path) and len(tok.value) >= 40
    assert mode(path) == 0o600 and mode(state) == 0o700
    assert path.read_text().strip() == tok.value
    assert tok.value not in repr(tok)
    again = load_or_create(state)
    assert again.value == tok.value and not again.generated
    assert [p.name for p in state.iterdir()] == ["token"]  # no temporary file left


def test_a_token_file_others_can_read_or_not_ours_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("x" * 40)
    path.chmod(0o644)
    with pytest.raises(TokenError, match="readable by other users"):
        load_or_create(tmp_path)
    path.chmod(0o600)
    path.write_text("short")
    with pytest.raises(TokenError, match="at least 16"):
        load_or_create(tmp_path)
    path.unlink()
    target = tmp_path / "elsewhere"
    target.write_text("y" * 40)
    target.chmod(0o600)
    path.symlink_to(target)
    with pytest.raises(TokenError, match="symlink"):
        load_or_create(tmp_path)


def _race(state: str, q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    q.put(load_or_create(Path(state)).value)


def test_concurrent_first_starts_agree_on_one_token(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "s"), q)) for _ in range(6)]
    for p in procs:
        p.start()
    values = {q.get(timeout=30) for _ in procs}
    for p in procs:
        p.join(30)
    assert len(values) == 1
    assert (tmp_path / "s" / "token").read_text().strip() == values.pop()


def test_torpor_token_overrides_the_token_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "f"
    f.write_text("from-the-file-0123456789\n")
    monkeypatch.delenv("TORPOR_TOKEN", raising=False)
    tok = given_token(str(f))
    assert (
        tok is not None
        and tok.value == "from-the-file-0123456789"
        and tok.source == f"--token-file {f}"
    )
    assert given_token(None) is None
    monkeypatch.setenv("TORPOR_TOKEN", "from-the-env-0123456789")
    tok = given_token(str(f))
    assert (
        tok is not None and tok.value == "from-the-env-0123456789" and tok.source == "TORPOR_TOKEN"
    )
    monkeypatch.setenv("TORPOR_TOKEN", "short")
    with pytest.raises(TokenError, match="at least 16"):
        given_token(None)


def test_state_dir_default_honours_torpor_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORPOR_STATE_DIR", str(tmp_path / "st"))
    assert default_state_dir() == tmp_path / "st"
    monkeypatch.delenv("TORPOR_STATE_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "torpor"


def test_the_cli_sends_the_env_token_else_the_file_and_the_file_only_to_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORPOR_TOKEN", raising=False)
    assert client_token(tmp_path) is None
    token, hint = api_token("http://127.0.0.1:8081", tmp_path)
    assert token is None and str(tmp_path / "token") in hint and "TORPOR_TOKEN" in hint
    value = load_or_create(tmp_path).value
    for url in ("http://127.0.0.1:8081", "http://localhost:8081", "http://[::1]:8081"):
        assert api_token(url, tmp_path)[0] == value, url
    token, hint = api_token("http://api.example:8081", tmp_path)
    assert token is None and "TORPOR_TOKEN" in hint
    monkeypatch.setenv("TORPOR_TOKEN", "env-token-0123456789")
    assert api_token("http://api.example:8081", tmp_path)[0] == "env-token-0123456789"
    assert api_token("http://127.0.0.1:8081", tmp_path)[0] == "env-token-0123456789"
