"""``Platform`` wires the parts a process runs: which servers it makes, in what order,
on which addresses, and that a component alone needs a shared store. Nothing listens:
the servers are built, not started."""

from __future__ import annotations

from pathlib import Path

import pytest

from torpor.up import ALL, Platform, UpConfig, UpError


def config(tmp_path: Path, **kw: object) -> UpConfig:
    return UpConfig(driver="process", state_dir=tmp_path / "state", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("health_port", "servers"),
    [
        (None, [("gateway", "127.0.0.1:18080"), ("api", "127.0.0.1:18081")]),
        (
            18082,
            [
                ("health", "127.0.0.1:18082"),
                ("gateway", "127.0.0.1:18080"),
                ("api", "127.0.0.1:18081"),
            ],
        ),
    ],
)
def test_up_builds_every_part_and_its_servers_in_order(
    tmp_path: Path, health_port: int | None, servers: list[tuple[str, str]]
) -> None:
    cfg = config(
        tmp_path, port=18080, api_port=18081, health_port=health_port, health_host="127.0.0.1"
    )
    p = Platform(cfg, ALL)
    assert [(name, where) for name, _server, where in p.servers] == servers
    assert p.driver is not None and p.driver.name == "process"
    assert p.controller is not None and p.gateway is not None and p.lease is not None
    assert p.store_kind == "embedded"
    assert (cfg.state_dir / "token").is_file()  # written before the API listens
    assert p.token_source


@pytest.mark.parametrize("components", [{"gateway"}, {"controller"}, {"api"}, {"api", "gateway"}])
def test_a_component_alone_needs_redis(tmp_path: Path, components: set[str]) -> None:
    with pytest.raises(UpError, match="alone needs a shared store: give --redis URL"):
        Platform(config(tmp_path), frozenset(components))
