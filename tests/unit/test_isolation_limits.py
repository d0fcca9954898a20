"""The pure parts of replica isolation: process rlimits and Docker network names."""

from __future__ import annotations

import resource

import pytest

from torpor.drivers import dockernet
from torpor.drivers.dockernet import bridge_name, network_name
from torpor.drivers.process import BASE_DATA, NOFILE, _thread_stack, _threads, replica_rlimits
from torpor.model import MiB


def test_data_limit_is_memory_plus_thread_stacks_plus_the_base() -> None:
    limits = replica_rlimits(256 * MiB, threads=64)
    expected = 256 * MiB + 64 * _thread_stack() + BASE_DATA
    assert limits["RLIMIT_DATA"] == (expected, expected)
    fewer = replica_rlimits(256 * MiB, threads=4)["RLIMIT_DATA"][0]
    assert fewer == 256 * MiB + 4 * _thread_stack() + BASE_DATA


def test_no_memory_size_means_no_data_limit_but_the_others() -> None:
    limits = replica_rlimits(0)
    assert "RLIMIT_DATA" not in limits
    assert limits["RLIMIT_CORE"] == (0, 0)
    assert (
        "RLIMIT_AS" not in limits and "RLIMIT_NPROC" not in limits and "RLIMIT_FSIZE" not in limits
    )


def test_open_files_never_exceed_the_inherited_hard_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    real = resource.getrlimit

    def fake(which: int) -> tuple[int, int]:
        return (256, 512) if which == resource.RLIMIT_NOFILE else real(which)

    monkeypatch.setattr(resource, "getrlimit", fake)
    assert replica_rlimits(64 * MiB)["RLIMIT_NOFILE"] == (512, 512)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, resource.RLIM_INFINITY))
    assert replica_rlimits(64 * MiB)["RLIMIT_NOFILE"] == (NOFILE, NOFILE)


def test_thread_count_comes_from_torpor_threads() -> None:
    assert _threads({}) == 64
    assert _threads({"TORPOR_THREADS": "8"}) == 8
    assert _threads({"TORPOR_THREADS": "zero"}) == 64
    assert _threads({"TORPOR_THREADS": "0"}) == 64


def test_bridge_names_fit_ifnamsiz_and_differ_per_function_and_installation() -> None:
    names = {
        bridge_name(inst, fn) for inst in ("a" * 12, "b" * 12) for fn in ("hello", "echo", "x" * 63)
    }
    assert len(names) == 6
    assert all(len(n) <= 15 and n.startswith("torpor") for n in names)
    assert bridge_name("a" * 12, "hello") == bridge_name(
        "a" * 12, "hello"
    )  # stable across restarts
    assert network_name("0123456789ab", "hello") == "torpor-01234567-hello"


def test_without_root_the_firewall_is_refused_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dockernet.os, "geteuid", lambda: 1000)
    assert dockernet.ensure_host_firewall("/bin/true") == "the platform does not run as root"
    nets = dockernet.Networks(lambda: None, "0123456789ab")  # type: ignore[arg-type, return-value]
    nets._firewall()
    assert nets.firewall_problem == "the platform does not run as root"


def test_host_access_setting_leaves_the_input_rule_out(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setenv("TORPOR_DOCKER_HOST_ACCESS", "1")
    monkeypatch.setattr(dockernet, "ensure_host_firewall", lambda: calls.append("input"))
    monkeypatch.setattr(dockernet, "ensure_metadata_block", lambda: calls.append("metadata"))
    nets = dockernet.Networks(lambda: None, "0123456789ab")  # type: ignore[arg-type, return-value]
    nets._firewall()
    assert calls == ["metadata"]
    assert nets.firewall_problem == "TORPOR_DOCKER_HOST_ACCESS=1"
