"""credentials: token and password sources, read fresh; errors never show the secret."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest

from waiting_room.credentials import (
    SecretError,
    TokenSource,
    credential_path,
    file_signature,
    jwt_expiry,
    read_secret_file,
    run_secret_command,
)

SECRET = "s3cr3t-T0KEN-value"


# -- files -------------------------------------------------------------------------------


def test_token_file_is_stripped(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"\n  {SECRET}  \n\n")
    assert TokenSource(file=str(path)).read() == SECRET


def test_token_file_is_read_fresh_each_time(tmp_path):
    path = tmp_path / "token"
    source = TokenSource(file=str(path))
    path.write_text("first\n")
    assert source.read() == "first"
    path.write_text("second\n")
    assert source.read() == "second"
    replacement = tmp_path / "token.new"
    replacement.write_text("third\n")
    os.replace(replacement, path)  # how tools rotate a file atomically
    assert source.read() == "third"


@pytest.mark.parametrize("content", ["", "\n", "   \n\t\n"])
def test_empty_token_file_is_an_error(tmp_path, content):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(SecretError) as info:
        TokenSource(file=str(path)).read()
    assert str(path) in str(info.value)
    assert "empty" in str(info.value)


def test_missing_token_file_is_an_error_naming_the_path(tmp_path):
    path = tmp_path / "absent"
    with pytest.raises(SecretError) as info:
        read_secret_file(path, "token_file")
    message = str(info.value)
    assert str(path) in message
    assert "token_file" in message


def test_unreadable_token_file_error_does_not_contain_the_token(tmp_path):
    path = tmp_path / "token"
    path.write_bytes(SECRET.encode() + b"\xff\xfe")  # not UTF-8
    with pytest.raises(SecretError) as info:
        read_secret_file(path, "token_file")
    assert SECRET not in str(info.value)
    assert str(path) in str(info.value)


def test_directory_as_token_file_is_an_error(tmp_path):
    with pytest.raises(SecretError):
        read_secret_file(tmp_path, "token_file")


def test_literal_token():
    assert TokenSource(literal=SECRET).read() == SECRET


def test_no_source_is_an_error():
    with pytest.raises(SecretError):
        TokenSource().read()


# -- commands ----------------------------------------------------------------------------


def py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_token_command_output_is_stripped():
    assert TokenSource(command=py(f"print('  {SECRET}  ')")).read() == SECRET


def test_token_command_is_run_each_time(tmp_path):
    counter = tmp_path / "n"
    counter.write_text("0")
    code = (
        "import pathlib; p = pathlib.Path(%r); n = int(p.read_text()) + 1; "
        "p.write_text(str(n)); print('token-%%d' %% n)" % str(counter)
    )
    source = TokenSource(command=py(code))
    assert source.read() == "token-1"
    assert source.read() == "token-2"


def test_token_command_non_zero_exit_is_an_error_without_the_output():
    with pytest.raises(SecretError) as info:
        run_secret_command(py(f"import sys; print({SECRET!r}); sys.exit(3)"), "token_command")
    message = str(info.value)
    assert "3" in message
    assert SECRET not in message


def test_token_command_stderr_is_not_in_the_error():
    with pytest.raises(SecretError) as info:
        run_secret_command(py(f"import sys; sys.stderr.write({SECRET!r}); sys.exit(1)"), "token_command")
    assert SECRET not in str(info.value)


def test_token_command_printing_nothing_is_an_error():
    with pytest.raises(SecretError) as info:
        run_secret_command(py("print('   ')"), "token_command")
    assert "nothing" in str(info.value)


def test_missing_token_command_is_an_error(tmp_path):
    with pytest.raises(SecretError) as info:
        run_secret_command([str(tmp_path / "no-such-program")], "token_command")
    assert "no-such-program" in str(info.value)


# -- systemd credentials -----------------------------------------------------------------


def test_credential_path_without_credentials_directory(monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(SecretError) as info:
        credential_path("upstream-token")
    assert "CREDENTIALS_DIRECTORY" in str(info.value)


def test_credential_path_with_credentials_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert credential_path("upstream-token") == tmp_path / "upstream-token"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../etc/passwd"])
def test_credential_path_refuses_names_that_escape(monkeypatch, tmp_path, name):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(SecretError):
        credential_path(name)


def test_credential_token_source(monkeypatch, tmp_path):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    (tmp_path / "upstream-token").write_text(SECRET + "\n")
    source = TokenSource(credential="upstream-token")
    assert source.read() == SECRET
    assert source.watched_file == tmp_path / "upstream-token"


def test_credential_source_without_directory(monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    source = TokenSource(credential="upstream-token")
    assert source.watched_file is None
    with pytest.raises(SecretError):
        source.read()


def test_watched_file(tmp_path):
    assert TokenSource(file=str(tmp_path / "t")).watched_file == tmp_path / "t"
    assert TokenSource(literal="x").watched_file is None
    assert TokenSource(command=("true",)).watched_file is None


# -- JWT expiry --------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims: object) -> str:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}.{b64url(b'not-a-signature')}"


@pytest.mark.parametrize("exp", [1_700_000_000, 1_700_000_000.5, 2**33])
def test_jwt_expiry(exp):
    assert jwt_expiry(jwt({"sub": "daemon", "exp": exp})) == float(exp)


def test_jwt_expiry_with_padding_sensitive_payload():
    for pad in range(4):  # payload lengths that need 0..3 "=" to decode
        token = jwt({"exp": 1_700_000_000, "x": "y" * pad})
        assert jwt_expiry(token) == 1_700_000_000.0


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c.d",
        "a.!!!.c",
        "a.b.c",
        f"x.{b64url(b'not json')}.y",
        f"x.{b64url(b'[1,2]')}.y",
        f"x.{b64url(bytes([0xff, 0xfe]))}.y",
        SECRET,
    ],
)
def test_jwt_expiry_of_garbage_is_none(token):
    assert jwt_expiry(token) is None


@pytest.mark.parametrize("claims", [{"sub": "x"}, {"exp": "1700000000"}, {"exp": None}, {"exp": True}, {"exp": [1]}])
def test_jwt_without_a_numeric_exp_is_none(claims):
    assert jwt_expiry(jwt(claims)) is None


# -- file signature ----------------------------------------------------------------------


def test_file_signature_changes_when_the_file_is_replaced(tmp_path):
    path = tmp_path / "token"
    path.write_text("old-token\n")
    before = file_signature(path)
    assert before is not None
    assert file_signature(path) == before  # stable while untouched
    new = tmp_path / "token.tmp"
    new.write_text("new-token\n")  # same size
    os.replace(new, path)
    assert file_signature(path) != before


def test_file_signature_changes_when_rewritten_in_place(tmp_path):
    path = tmp_path / "token"
    path.write_text("a\n")
    before = file_signature(path)
    path.write_text("longer token\n")
    assert file_signature(path) != before


def test_file_signature_of_nothing(tmp_path):
    assert file_signature(None) is None
    assert file_signature(Path(tmp_path / "absent")) is None
