"""The Docker driver's warm pool: its pure decisions (sizing, refill, eligibility, limits)
and the specialise request format, read back by the pooled container's own parser."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from torpor.drivers import dockerpool
from torpor.drivers.dockerpool import limits_update, not_pooled, pool_size, refill_count
from torpor.model import MiB, Resources, Revision, Spec
from torpor.runtime import fetch

INF = float("inf")


@pytest.mark.parametrize(
    ("size", "idle", "creating", "since_take", "want"),
    [
        (10, 0, 0, INF, 2),  # empty: at most MAX_PARALLEL at once
        (10, 9, 0, INF, 1),  # one short
        (10, 10, 0, INF, 0),  # full
        (10, 8, 2, INF, 0),  # the missing ones are being made
        (10, 7, 1, INF, 1),  # one more in flight allowed
        (10, 12, 0, INF, 0),  # over (size lowered): never negative
        (0, 0, 0, INF, 0),  # off
        (10, 0, 0, 0.1, 0),  # a take just now: the burst's starts go first
        (10, 0, 0, 0.5, 2),  # quiet long enough
        (1, 0, 0, INF, 1),  # never beyond the size
    ],
)
def test_refill_count(size: int, idle: int, creating: int, since_take: float, want: int) -> None:
    assert refill_count(size, idle, creating, since_take) == want


@pytest.mark.parametrize(
    ("raw", "want"),
    [(None, 10), ("", 10), ("0", 0), ("3", 3), (" 25 ", 25), ("100", 100)],
)
def test_pool_size_setting(raw: str | None, want: int) -> None:
    env = {} if raw is None else {"TORPOR_DOCKER_POOL": raw}
    assert pool_size(env) == want


@pytest.mark.parametrize("raw", ["-1", "101", "ten", "1.5", "٣", "1e3"])
def test_pool_size_refuses_nonsense(raw: str) -> None:
    with pytest.raises(ValueError, match="TORPOR_DOCKER_POOL"):
        pool_size({"TORPOR_DOCKER_POOL": raw})


def _rev(tmp: Path, **spec: object) -> Revision:
    src = tmp / "src"
    src.mkdir(exist_ok=True)
    (src / "handler.py").write_text("def handle(r):\n    return 'x'\n")
    s = Spec(name="f", handler=None if spec.get("image") else "handler:handle", **spec)  # type: ignore[arg-type]
    return Revision(name="f-00001", function="f", number=1, spec=s, source=str(src))


def test_not_pooled(tmp_path: Path) -> None:
    assert not_pooled(_rev(tmp_path)) is None
    assert "image" in (not_pooled(_rev(tmp_path, image="nginx:1")) or "")
    assert "port" in (not_pooled(_rev(tmp_path, port=9000)) or "")
    assert "limit" in (not_pooled(_rev(tmp_path, resources=Resources(cpu=0))) or "")
    assert "labels" in (not_pooled(_rev(tmp_path, labels={"team": "web"})) or "")
    rev = _rev(tmp_path)
    Path(rev.source or "", "requirements.txt").write_text("six\n")
    assert "requirements" in (not_pooled(rev) or "")
    rev.source = str(tmp_path / "gone")
    assert not_pooled(rev) == "no source folder"


@pytest.mark.parametrize(
    ("resources", "want"),
    [
        (Resources(), {}),
        (Resources(cpu=0.25), {"NanoCpus": 250_000_000}),
        (Resources(memory=128 * MiB), {"Memory": 128 * MiB, "MemorySwap": 256 * MiB}),
        (
            Resources(cpu=2, memory=1024 * MiB),
            {"NanoCpus": 2_000_000_000, "Memory": 1024 * MiB, "MemorySwap": 2048 * MiB},
        ),
        (Resources(cpu=0.0000001), {"NanoCpus": 1_000_000}),  # Docker's smallest
    ],
)
def test_limits_update(resources: Resources, want: dict[str, int]) -> None:
    assert limits_update(resources) == want


def test_the_specialise_body_reads_back_in_the_container() -> None:
    archive = b"\x1f\x8b not really"
    sha = hashlib.sha256(archive).hexdigest()
    body = dockerpool.specialise_body(sha, {"A": "1", "SECRET": "s\nwith newline"}, archive)
    meta, _, rest = body.partition(b"\n")
    assert rest == archive
    assert fetch.parse_specialise(meta) == (sha, {"A": "1", "SECRET": "s\nwith newline"})


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"sha256": "ab" * 31, "env": {}},  # too short
        {"sha256": "AB" * 32, "env": {}},  # upper case
        {"sha256": "ab" * 32},  # no env
        {"sha256": "ab" * 32, "env": []},
        {"sha256": "ab" * 32, "env": {"1BAD": "x"}},
        {"sha256": "ab" * 32, "env": {"A=B": "x"}},
        {"sha256": "ab" * 32, "env": {"A": 1}},
        {"sha256": "ab" * 32, "env": {"A": "nul\x00"}},
    ],
)
def test_the_container_refuses_a_bad_specialise_request(doc: object) -> None:
    with pytest.raises(ValueError):
        fetch.parse_specialise(json.dumps(doc).encode())


def test_tokens_are_long_and_fresh() -> None:
    a, b = dockerpool.new_token(), dockerpool.new_token()
    assert a != b and len(a) >= 32


def test_the_archive_is_the_normalised_one_expected_by_its_hash(tmp_path: Path) -> None:
    from torpor.drivers.docker import DockerDriver
    from torpor.sources import pack

    driver = DockerDriver(tmp_path / "state", pool_size=0)  # no engine call
    rev = _rev(tmp_path)
    rev.source_sha256 = pack(Path(rev.source or "")).sha256
    want, data = driver._archive(rev)
    assert want == rev.source_sha256 == hashlib.sha256(data).hexdigest()
    other = _rev(tmp_path)
    other.name, other.source_sha256 = "f-00002", "ab" * 32  # not what its folder packs to
    with pytest.raises(OSError, match="packs to"):
        driver._archive(other)  # the revision's image runs it instead


def test_a_source_too_big_for_a_members_tmpfs_is_not_pooled(tmp_path: Path) -> None:
    from torpor.drivers.docker import DockerDriver

    driver = DockerDriver(tmp_path / "state", pool_size=0)
    rev = _rev(tmp_path)
    with open(Path(rev.source or "", "big.bin"), "wb") as f:
        f.truncate(dockerpool.MAX_SOURCE + 1)  # sparse: its size counts, not its blocks
    with pytest.raises(OSError, match="over the pool"):
        driver._archive(rev)


async def test_the_pool_fills_refills_after_a_take_and_closes_clean() -> None:
    made: list[str] = []
    discarded: list[str] = []

    async def create() -> dockerpool.Member:
        await asyncio.sleep(0.01)
        made.append(f"c{len(made)}")
        return dockerpool.Member(made[-1], "127.0.0.1:1", "t" * 40)

    async def discard(cid: str) -> None:
        discarded.append(cid)

    pool = dockerpool.Pool(3, create, discard)
    assert pool.take() is None  # not started: nothing waits, the caller runs its image
    pool.start()
    assert await pool.wait_full(5)
    assert made == ["c0", "c1", "c2"]
    taken = pool.take()
    assert taken is not None and taken.container_id == "c0"  # the oldest first
    assert taken.container_id not in pool.ids()
    assert await pool.wait_full(5)  # refilled, after the quiet time
    assert made == ["c0", "c1", "c2", "c3"] and "c0" not in pool.ids()
    await pool.close()
    assert sorted(discarded) == ["c1", "c2", "c3"]  # the taken one is a replica: not ours
    assert pool.idle == []


async def test_a_failing_create_backs_off_instead_of_spinning() -> None:
    calls = 0

    async def create() -> dockerpool.Member:
        nonlocal calls
        calls += 1
        raise RuntimeError("no engine")

    async def discard(cid: str) -> None:
        raise AssertionError("nothing to discard")

    pool = dockerpool.Pool(10, create, discard)
    pool.start()
    await asyncio.sleep(0.3)
    assert 1 <= calls <= dockerpool.MAX_PARALLEL  # then a backoff of >= 1 s
    assert pool.failures >= 1 and pool.idle == []
    await pool.close()


async def test_pool_size_zero_never_creates() -> None:
    async def create() -> dockerpool.Member:
        raise AssertionError("must not be called")

    async def discard(cid: str) -> None:
        raise AssertionError("must not be called")

    pool = dockerpool.Pool(0, create, discard)
    pool.start()
    await asyncio.sleep(0.05)
    assert pool.take() is None
    await pool.close()
