"""Secrets as pure logic: the spec's ``secrets:`` mapping (torpor.spec), the model's
round trip, and torpor.secret (value rules, who uses a secret, redaction)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from torpor.model import Function, Revision, Spec, TrafficTarget
from torpor.secret import MAX_VALUE, MissingSecret, SecretValueError, check_value, redact, users
from torpor.spec import SpecError, parse_spec, spec_to_yaml_dict, validate_secret_name


def refused(**top: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec({"name": "hello", **top})
    return info.value


# --- the spec -------------------------------------------------------------------------------


def test_secrets_map_env_names_to_secret_names() -> None:
    spec = parse_spec(
        {
            "name": "hello",
            "env": {"GREETING": "hi"},
            "secrets": {"DB_PASSWORD": "db-password", "api_key": "2fa-seed"},
        }
    )
    assert spec.secrets == {"DB_PASSWORD": "db-password", "api_key": "2fa-seed"}
    assert spec.env == {"GREETING": "hi"}
    assert parse_spec({"name": "hello"}).secrets == {}
    assert parse_spec({"name": "hello", "secrets": None}).secrets == {}


def test_secrets_round_trip_through_yaml_and_the_model() -> None:
    spec = parse_spec({"name": "hello", "secrets": {"DB_PASSWORD": "db-password"}})
    doc = spec_to_yaml_dict(spec)
    assert doc["secrets"] == {"DB_PASSWORD": "db-password"}
    assert parse_spec(yaml.safe_load(yaml.safe_dump(doc))) == spec
    assert Spec.from_dict(spec.to_dict()) == spec
    old = spec.to_dict()
    del old["secrets"]  # a record written before secrets existed
    assert Spec.from_dict(old).secrets == {}


@pytest.mark.parametrize(
    ("secrets", "path", "words"),
    [
        ({"1X": "a"}, "secrets.1X", "a variable name"),
        ({"A-B": "a"}, "secrets.A-B", "a variable name"),
        ({"PORT": "a"}, "secrets.PORT", "PORT is reserved"),
        ({"TORPOR_HANDLER": "a"}, "secrets.TORPOR_HANDLER", "TORPOR_HANDLER is reserved"),
        ({"K_SERVICE": "a"}, "secrets.K_SERVICE", "K_SERVICE is reserved"),
        ({"GREETING": "a"}, "secrets.GREETING", "GREETING is also set in env"),
        ({"DB": "Db-Password"}, "secrets.DB", "not a secret name"),
        ({"DB": "-x"}, "secrets.DB", "not a secret name"),
        ({"DB": "x-"}, "secrets.DB", "not a secret name"),
        ({"DB": "x" * 64}, "secrets.DB", "not a secret name"),
        ({"DB": 5}, "secrets.DB", "not a secret name"),
        ({"DB": None}, "secrets.DB", "not a secret name"),
        ({5: "a"}, "secrets", "is not a string"),
    ],
)
def test_bad_secrets_are_refused_by_path(secrets: dict[Any, Any], path: str, words: str) -> None:
    err = refused(env={"GREETING": "hi"}, secrets=secrets)
    assert err.path == path
    assert words in str(err)


def test_secrets_must_be_a_mapping() -> None:
    assert refused(secrets=["DB_PASSWORD"]).path == "secrets"


def test_a_value_pasted_where_a_name_belongs_is_not_echoed() -> None:
    err = refused(secrets={"DB_PASSWORD": "Hunter2-Correct-Horse!"})
    assert err.path == "secrets.DB_PASSWORD"
    assert "Hunter2" not in str(err)


def test_secret_names_are_dns_labels() -> None:
    for good in ("db-password", "a", "2fa", "x" * 63, "a-1"):
        assert validate_secret_name(good) == good
    for bad in ("", "A", "a_b", "a.b", "-a", "a-", "x" * 64, "é", None, 3):
        with pytest.raises(SpecError):
            validate_secret_name(bad)


# --- values ---------------------------------------------------------------------------------


def test_values_are_utf8_text_without_nul_up_to_the_cap() -> None:
    assert check_value(b"hunter2") == "hunter2"
    assert check_value("pässwörd\n".encode()) == "pässwörd\n"
    assert check_value(b"x" * MAX_VALUE) == "x" * MAX_VALUE


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (b"", "empty"),
        (b"x" * (MAX_VALUE + 1), "over the 64 KiB cap"),
        (b"hunter2\xff\xfe", "not valid UTF-8 (at byte 7)"),
        (b"hunter2\x00tail", "NUL character (at character 7)"),
    ],
)
def test_bad_values_are_refused_without_quoting_them(value: bytes, words: str) -> None:
    with pytest.raises(SecretValueError) as info:
        check_value(value)
    assert words in str(info.value)
    assert "hunter" not in str(info.value) and "xxxx" not in str(info.value)


def test_a_missing_secret_names_the_secret_and_the_variable() -> None:
    assert str(MissingSecret("DB_PASSWORD", "db-password")) == (
        "secret 'db-password' (for DB_PASSWORD) does not exist; set it with `torpor secret set db-password`"
    )


# --- who uses a secret ----------------------------------------------------------------------


def _fn(
    name: str, specs: list[dict[str, str]], traffic: dict[int, tuple[int, str | None]]
) -> Function:
    revs = [
        Revision(
            name=f"{name}-{i:05d}",
            function=name,
            number=i,
            status="ready",
            spec=Spec(name=name, secrets=s),
        )
        for i, s in enumerate(specs, 1)
    ]
    return Function(
        name=name,
        revisions=revs,
        traffic=[TrafficTarget(f"{name}-{i:05d}", pct, tag) for i, (pct, tag) in traffic.items()],
    )


def test_users_are_the_newest_and_the_routed_revisions() -> None:
    fns = [
        _fn(
            "a", [{"X": "old"}, {"X": "new"}], {1: (100, None)}
        ),  # newest not routed yet: both count
        _fn(
            "b", [{"X": "gone"}, {"X": "new"}], {2: (100, None)}
        ),  # rev 1 out of traffic: no longer a user
        _fn(
            "c", [{"X": "tagged"}, {}], {1: (0, "old"), 2: (100, None)}
        ),  # a tag keeps it reachable
        _fn("d", [], {}),
    ]
    assert users(fns) == {"old": ["a"], "new": ["a", "b"], "tagged": ["c"]}


# --- redaction ------------------------------------------------------------------------------


def test_redact_replaces_every_value_longest_first() -> None:
    text = "connect failed: password=hunter2hunter2 (retry with hunter2)"
    assert (
        redact(text, ["hunter2", "hunter2hunter2"])
        == "connect failed: password=*** (retry with ***)"
    )
    assert (
        redact("a b c", ["a", "abc"]) == "a b c"
    )  # values under 4 characters would match anywhere
    assert redact("nothing here", []) == "nothing here"
