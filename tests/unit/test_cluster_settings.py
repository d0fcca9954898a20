"""Settings cluster mode gives through the environment (the chart sets no flag for them):
TORPOR_DRIVER, TORPOR_PUBLIC_URL, and how function URLs follow the public URL."""

from __future__ import annotations

import argparse

import pytest

from torpor.api.app import ApiConfig, function_url
from torpor.up import UpConfig, UpError, check_config, check_public_url


def _parser(monkeypatch: pytest.MonkeyPatch, **env: str) -> argparse.ArgumentParser:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from torpor.cli.main import build_parser

    return build_parser()  # defaults are read from the env when the parser is built


def test_the_driver_comes_from_torpor_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        _parser(monkeypatch, TORPOR_DRIVER="kubernetes").parse_args(["controller"]).driver
        == "kubernetes"
    )
    monkeypatch.delenv("TORPOR_DRIVER")
    assert _parser(monkeypatch).parse_args(["controller"]).driver == "auto"
    # a flag still wins over the env
    p = _parser(monkeypatch, TORPOR_DRIVER="kubernetes")
    assert p.parse_args(["up", "--driver", "process"]).driver == "process"


def test_the_public_url_comes_from_torpor_public_url(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _parser(monkeypatch, TORPOR_PUBLIC_URL="https://fn.example.com").parse_args(["api"])
    assert args.public_url == "https://fn.example.com"
    monkeypatch.delenv("TORPOR_PUBLIC_URL")
    assert _parser(monkeypatch).parse_args(["api"]).public_url is None


@pytest.mark.parametrize(
    "url,expected",
    [
        ("https://fn.example.com", "https://fn.example.com"),
        ("https://fn.example.com/", "https://fn.example.com"),
        ("http://fn.example.com:8080", "http://fn.example.com:8080"),
        ("http://[fd00::1]:8080", "http://[fd00::1]:8080"),
    ],
)
def test_good_public_urls(url: str, expected: str) -> None:
    assert check_public_url(url) == expected


@pytest.mark.parametrize(
    "url,why",
    [
        ("fn.example.com", "expected http:// or https://"),
        ("ftp://fn.example.com", "expected http:// or https://"),
        ("https://", "expected http:// or https://"),
        ("https://user:pw@fn.example.com", "credentials"),
        ("https://fn.example.com/app", "scheme://host[:port] only"),
        ("https://fn.example.com?x=1", "scheme://host[:port] only"),
        ("https://fn.example.com:99999", "port"),
    ],
)
def test_bad_public_urls_are_refused_naming_the_flag(url: str, why: str) -> None:
    with pytest.raises(UpError, match="--public-url") as e:
        check_public_url(url)
    assert why in str(e.value)


def test_function_urls_follow_the_public_url() -> None:
    cfg = UpConfig(public_url="https://fn.example.com/", token="t" * 20, api_host="0.0.0.0")
    check_config(cfg)
    assert cfg.public_url == "https://fn.example.com"
    api = ApiConfig(
        state_dir=cfg.state_dir, token="t" * 20, gateway_url=cfg.public_url, domain="fn.example.com"
    )
    assert function_url(api, "hello") == "https://hello.fn.example.com/"
