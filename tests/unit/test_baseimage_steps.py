"""The pure steps of building the base image: naming the imported image and pruning
the root file system (no debootstrap, no engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from torpor.drivers.baseimage import _PRUNE, prune_rootfs, repo_and_tag


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("torpor/python-base:bookworm", ("torpor/python-base", "bookworm")),
        ("python:3.12-slim", ("python", "3.12-slim")),
        ("base", ("base", "latest")),
        ("localhost:5000/base", ("localhost:5000/base", "latest")),  # a port, not a tag
        ("localhost:5000/base:v1", ("localhost:5000/base", "v1")),
        (":tag", (":tag", "latest")),
    ],
)
def test_repo_and_tag(name: str, expected: tuple[str, str]) -> None:
    assert repo_and_tag(name) == expected


def test_prune_empties_the_caches_keeps_their_folders_and_apt_locks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not part of the image")
    for rel in _PRUNE:
        d = root / rel
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f").write_text("x")
        (d / "file.deb").write_text("x")
        (d / "lock").write_text("")
        (d / "link").symlink_to(outside, target_is_directory=True)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "python3").write_text("kept")

    prune_rootfs(root)

    for rel in _PRUNE:
        assert sorted(p.name for p in (root / rel).iterdir()) == ["lock"]
    assert (root / "usr" / "bin" / "python3").read_text() == "kept"
    assert (outside / "keep.txt").read_text() == "not part of the image"  # link not followed


def test_prune_tolerates_a_root_without_those_folders(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    prune_rootfs(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["etc"]
