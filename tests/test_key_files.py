"""Key files and the key variable: what is read, what is refused, and how it is said."""

import os

import pytest

import udp_timecheck as utc
from conftest import KEY, POSIX_ONLY, run_cli, write_key_file


def test_key_from_the_environment(monkeypatch):
    monkeypatch.setenv(utc.KEY_ENV, "  secret from env \n")
    assert utc.load_key(None) == (b"secret from env", [])
    monkeypatch.delenv(utc.KEY_ENV)
    assert utc.load_key(None) == (None, [])


def test_key_file_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(utc.KEY_ENV, "from env")
    assert utc.load_key(write_key_file(tmp_path))[0] == KEY


@pytest.mark.parametrize("key", ["secret\x1c", "\u00a0secret\u00a0", "  secret\n", "s\u00e9cret\x1f"])
def test_the_same_key_gives_the_same_bytes_from_file_and_variable(tmp_path, key):
    path = tmp_path / "key"
    path.write_bytes(key.encode("utf-8"))
    path.chmod(0o600)
    from_file = utc.load_key(str(path), environ={})[0]
    from_variable = utc.load_key(None, environ={utc.KEY_ENV: key})[0]
    assert from_file == from_variable == key.encode("utf-8").strip()


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_key_file_readable_by_others_is_warned_about(tmp_path):
    key, warnings = utc.load_key(write_key_file(tmp_path, mode=0o644))
    assert key == KEY and len(warnings) == 1 and "chmod 600" in warnings[0]
    assert utc.load_key(write_key_file(tmp_path, mode=0o600))[1] == []


@pytest.mark.parametrize("content", [b"", b"  \n\t"])
def test_empty_key_is_a_usage_error(tmp_path, content):
    with pytest.raises(utc.TimecheckError, match="empty") as caught:
        utc.load_key(write_key_file(tmp_path, content=content))
    assert caught.value.exit_code == 2


def test_a_set_but_empty_variable_is_an_error(monkeypatch, capsys):
    monkeypatch.setenv(utc.KEY_ENV, "")
    assert utc.main(["client", "127.0.0.1", "9"]) == 2
    assert "UDP_TIMECHECK_KEY is empty; unset it to run without a key" in capsys.readouterr().err
    monkeypatch.setenv(utc.KEY_ENV, " \t\n")
    assert utc.main(["server", "127.0.0.1", "0"]) == 2


@POSIX_ONLY
@pytest.mark.parametrize("path, message", [("/dev/zero", "not a regular file"),
                                           ("/dev/null", "not a regular file"),
                                           (".", "Is a directory")])
def test_a_key_file_must_be_a_regular_file(path, message, capsys):
    assert utc.main(["client", "--key-file", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@POSIX_ONLY
def test_a_fifo_as_key_file_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "key"
    os.mkfifo(str(fifo))
    result = run_cli("server", "127.0.0.1", "0", "--key-file", fifo, timeout=30)
    assert result.returncode == 2 and "not a regular file" in result.stderr


def test_a_huge_key_file_is_refused(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(b"k" * (utc.MAX_KEY_FILE + 1))
    path.chmod(0o600)
    with pytest.raises(utc.TimecheckError, match="larger than") as caught:
        utc.load_key(str(path))
    assert caught.value.exit_code == 2
