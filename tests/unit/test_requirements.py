"""torpor.drivers.pip: requirements.txt names packages from the index and nothing else;
pip runs isolated, wheels only, from an empty directory, with a scrubbed environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from torpor.drivers.base import BuildError
from torpor.drivers.pip import (
    RequirementsError,
    parse_requirements,
    pip_command,
    pip_env,
    read_requirements,
)

ACCEPTED = [
    ("six", "six"),
    ("six==1.16.0", "six==1.16.0"),
    ("  Django >= 4.2 , < 5  ", "Django<5,>=4.2"),
    ("requests[socks,security]>=2.31", "requests[security,socks]>=2.31"),
    ('requests>=2; python_version >= "3.8"', 'requests>=2; python_version >= "3.8"'),
    ("zope.interface~=6.0", "zope.interface~=6.0"),
    ("Foo_Bar.baz-qux", "Foo_Bar.baz-qux"),
    ("six  # pinned later", "six"),
    (
        'pywin32; sys_platform == "win32" and platform_machine != "x86-64"',
        'pywin32; sys_platform == "win32" and platform_machine != "x86-64"',
    ),
]

REFUSED = [
    ("p-1.0.tar.gz", "a file name"),
    ("P-1.0.TGZ", "a file name"),
    ("p-1.0-py3-none-any.whl", "a file name"),
    ("pkg.zip", "a file name"),
    ("./x", "paths are not accepted"),
    ("./p-1.0.tar.gz", "paths are not accepted"),
    ("../x", "paths are not accepted"),
    ("/tmp/p-1.0.tar.gz", "paths are not accepted"),
    ("~/x", "paths are not accepted"),
    ("sub/dir", "paths are not accepted"),
    ("C:\\x\\p.zip", "paths are not accepted"),
    (".", "paths are not accepted"),
    ("-e .", "pip options are not accepted (-e)"),
    ("--editable=.", "pip options are not accepted (--editable)"),
    ("-r other.txt", "pip options are not accepted (-r)"),
    ("-c constraints.txt", "pip options are not accepted (-c)"),
    ("--index-url http://127.0.0.1:9/simple", "pip options are not accepted (--index-url)"),
    ("-i http://127.0.0.1:9/simple", "pip options are not accepted (-i)"),
    (
        "--extra-index-url=http://127.0.0.1:9/simple",
        "pip options are not accepted (--extra-index-url)",
    ),
    ("--find-links .", "pip options are not accepted (--find-links)"),
    ("--no-binary :all:", "pip options are not accepted (--no-binary)"),
    ("six --hash=sha256:" + "0" * 64, "pip options are not accepted (--hash)"),
    ("six==1.16.0 --install-option=--prefix=/x", "pip options are not accepted (--install-option)"),
    ("${HOME}", "environment variables"),
    ("six==${TORPOR_TOKEN}", "environment variables"),
    ('six; python_version == "${HOME}"', "environment variables"),
    ("git+https://example.invalid/x.git", "URLs are not accepted"),
    ("https://example.invalid/p-1.0.tar.gz", "URLs are not accepted"),
    ("foo @ file:///x", "URLs are not accepted"),
    ("foo@https://example.invalid/foo.whl", "URLs are not accepted"),
    ("foo @ file:x", "direct references"),
    ("this is not ! a requirement", "not a valid requirement"),
    ("six ==", "not a valid requirement"),
]


@pytest.mark.parametrize("line,canonical", ACCEPTED)
def test_pep_508_lines_are_accepted_and_reserialised(line: str, canonical: str) -> None:
    assert parse_requirements(line + "\n") == [canonical]


@pytest.mark.security
@pytest.mark.parametrize("line,why", REFUSED)
def test_requirements_beyond_the_index_are_refused(attack, line: str, why: str) -> None:
    """Deploy a requirements.txt line that is a file, path, URL, pip option or ${VAR}."""
    with pytest.raises(RequirementsError) as err:
        parse_requirements(f"six\n\n# a comment\n{line}\n")
    msg = str(err.value)
    assert msg.startswith(f"requirements.txt:4: {line.strip()[:77]!r}"[:40]), msg
    assert why in msg and msg.endswith('python_version >= "3.10"'), msg
    assert err.value.line == 4 and err.value.field == "requirements.txt:4"
    assert isinstance(err.value, BuildError)
    attack.ended(f"400 {msg[:150]}")


def test_continuations_and_comments() -> None:
    text = "# header\nsix \\\n  ==1.16.0  # pinned\n\n   \nidna\n"
    assert parse_requirements(text) == ["six==1.16.0", "idna"]
    with pytest.raises(
        RequirementsError, match=r"^requirements\.txt:2: .*pip options are not accepted \(--hash\)"
    ):
        parse_requirements("six\nidna \\\n  --hash=sha256:00\n")


@pytest.mark.security
def test_read_requirements_refuses_links_big_files_and_non_utf8(tmp_path: Path, attack) -> None:
    """Ship a requirements.txt that is a symlink to a host file, huge, or not UTF-8."""
    (tmp_path / "requirements.txt").symlink_to("/etc/hostname")
    with pytest.raises(RequirementsError, match="regular file"):
        read_requirements(tmp_path)
    (tmp_path / "requirements.txt").unlink()
    (tmp_path / "requirements.txt").write_text("six\n" * 40_000)
    with pytest.raises(RequirementsError, match="over 128 KiB"):
        read_requirements(tmp_path)
    (tmp_path / "requirements.txt").write_bytes(b"six\nid\xffna\n")
    with pytest.raises(RequirementsError, match=r"^requirements\.txt:2: .*not UTF-8"):
        read_requirements(tmp_path)
    (tmp_path / "requirements.txt").write_text("# nothing\n\n")
    assert read_requirements(tmp_path) is None
    (tmp_path / "requirements.txt").write_text("\ufeffsix\n")
    assert read_requirements(tmp_path) == ["six"]
    assert read_requirements(tmp_path / "nowhere") is None
    attack.ended("refused: regular file / over 128 KiB / not UTF-8")


@pytest.mark.security
def test_pip_reads_no_configuration_and_builds_nothing(tmp_path: Path, monkeypatch, attack) -> None:
    """Steer pip through the platform's environment (PIP_*, PYTHONPATH) or options."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_BINARY", ":all:")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("TORPOR_TOKEN", "a-secret-that-pip-must-not-see")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    cmd = pip_command(["six==1.16.0", 'idna; python_version >= "3"'], tmp_path / "t")
    assert cmd[1:5] == ["-I", "-m", "pip", "install"]
    assert "--isolated" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--") + 1 :] == ["six==1.16.0", 'idna; python_version >= "3"']
    assert not any(a.startswith(("-r", "--requirement")) for a in cmd)
    env = pip_env(tmp_path / "home")
    assert not any(k.startswith(("PIP_", "PYTHON", "TORPOR")) for k in env)
    assert env["HOME"] == str(tmp_path / "home")
    assert env["HTTPS_PROXY"] == "http://127.0.0.1:3128"  # how to reach the index: the operator's
    with pytest.raises(BuildError):
        pip_command(["-e ."], tmp_path / "t")
    monkeypatch.setenv("TORPOR_PIP_INDEX_URL", "https://mirror.example/simple")
    cmd = pip_command(["six"], tmp_path / "t")
    assert cmd[cmd.index("--index-url") + 1] == "https://mirror.example/simple"
    assert os.environ["PIP_INDEX_URL"]  # untouched for the platform itself
    attack.ended("pip: -I --isolated --only-binary=:all:, env scrubbed")


def test_pip_never_installs_through_a_linked_target(tmp_path: Path) -> None:
    # Defence in depth: uploads can no longer carry links, but a source folder unpacked
    # before this check (or by other means) might.
    from torpor.drivers.pip import install

    host = tmp_path / "host-folder"
    host.mkdir()
    (tmp_path / ".deps").symlink_to(host)
    with pytest.raises(BuildError, match="not a link or a file"):
        install(["six"], tmp_path / ".deps", say=lambda _line: None)
    assert list(host.iterdir()) == []
