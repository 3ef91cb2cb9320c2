"""The strict parsers: each accepts one clear shape and refuses the rest with a message naming the input and a fix."""

from __future__ import annotations

import math

import pytest
from metaflow_sandbox import Backend, Resources, SandboxError, SandboxSpec, parse


@pytest.mark.parametrize("word", ["no", "NO", "false", "False", "0", "off", " off ", False, 0])
def test_boolean_off_words(word):
    assert parse.boolean(word, "network") is False


@pytest.mark.parametrize("word", ["yes", "true", "True", "1", "on", True, 1])
def test_boolean_on_words(word):
    assert parse.boolean(word, "network") is True


@pytest.mark.parametrize("value", ["maybe", "", "nope", 2, -1, None, [], 0.5, "n"])
def test_boolean_refuses_anything_else(value):
    with pytest.raises(parse.InvalidInputError) as err:
        parse.boolean(value, "@sandbox(network=...)")
    text = str(err.value)
    assert "@sandbox(network=...) must be true or false" in text and "Fix: use true/yes/1/on (on) or false/no/0/off (off)" in text


@pytest.mark.parametrize("value, expected", [("2", 2.0), (0.5, 0.5), (" 3 ", 3.0), (4, 4.0), ("1e3", 1000.0)])
def test_positive_number_accepts(value, expected):
    assert parse.positive_number(value, "--cpu") == expected


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", float("nan"), math.inf, "-1", 0, "0", "abc", "", None, True, "1e400", [1]])
def test_positive_number_refuses(value):
    with pytest.raises(parse.InvalidInputError) as err:
        parse.positive_number(value, "--cpu")
    assert "--cpu must be a finite number greater than 0" in str(err.value) and "Fix: give e.g. --cpu 1" in str(err.value)


def test_positive_number_maximum_and_integer():
    assert parse.positive_number("4096", "--memory", integer=True) == 4096
    assert parse.positive_number(4096.0, "--memory", integer=True) == 4096
    with pytest.raises(parse.InvalidInputError, match="whole number"):
        parse.positive_number("1.5", "--memory", integer=True)
    with pytest.raises(parse.InvalidInputError, match="at most 8"):
        parse.positive_number(9, "cpu", maximum=8)
    assert parse.number(0, "gpu", allow_minimum=True, integer=True) == 0


@pytest.mark.parametrize("value, expected", [("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("2h", 7200.0), ("1d", 86400.0), (30, 30.0)])
def test_seconds_accepts_units(value, expected):
    assert parse.seconds(value, "--ttl") == expected


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "5x", "m", "", "1e400s"])
def test_seconds_refuses(value):
    with pytest.raises(parse.InvalidInputError) as err:
        parse.seconds(value, "--ttl")
    assert "--ttl must be a duration in seconds" in str(err.value) and "Fix:" in str(err.value)


def test_seconds_bounds():
    assert parse.seconds("60", "margin", minimum=60, allow_minimum=True) == 60.0
    with pytest.raises(parse.InvalidInputError, match="of at least 60"):
        parse.seconds("59", "margin", minimum=60, allow_minimum=True)
    with pytest.raises(parse.InvalidInputError, match="at most 100"):
        parse.seconds("2m", "margin", maximum=100)


@pytest.mark.parametrize("name", ["A", "_x", "MY_VAR_2", "a1"])
def test_env_name_accepts(name):
    assert parse.env_name(name, "env") == name


@pytest.mark.parametrize("name", ["A B", "1A", "A=B", "", "A-B", "É", None, 3])
def test_env_name_refuses(name):
    with pytest.raises(parse.InvalidInputError, match="must be a variable name"):
        parse.env_name(name, "env")


def test_environment_values_and_size():
    assert parse.environment({"A": 1, "B": "x"}, "env") == {"A": "1", "B": "x"}
    for bad, says in [
        ({"A": "a\0b"}, "without NUL"),
        ({"A": None}, "a string or a number"),
        ({"A": "x" * 200_000}, "at most 127 KiB"),
        ({"V%d" % i: "x" * 100_000 for i in range(6)}, "at most 512 KiB in all"),
        (["A=1"], "a dict of NAME: value"),
    ]:
        with pytest.raises(parse.InvalidInputError, match=says):
            parse.environment(bad, "env")


def test_labels_refuse_reserved_and_malformed():
    assert parse.labels(["team=ml", "cost.center=42"], "--label") == {"team": "ml", "cost.center": "42"}
    for bad in (["metaflow-sandbox=0"], ["metaflow.run=1"], ["metaflow-sandbox.source=x"]):
        with pytest.raises(parse.InvalidInputError, match="set by metaflow-sandbox itself"):
            parse.labels(bad, "--label")
    for bad in (["a b=1"], ["=1"], ["noequals"], {"k": "two\nlines"}):
        with pytest.raises(parse.InvalidInputError):
            parse.labels(bad, "--label")
    assert parse.is_reserved_label("metaflow.flow") and not parse.is_reserved_label("metaflowx")


def test_key_value_and_names():
    assert parse.key_value("A==b", "--env") == ("A", "=b")
    with pytest.raises(parse.InvalidInputError, match="KEY=VALUE"):
        parse.key_value(" A=1", "--env")
    assert parse.names("A, B,,C ", "FORWARD") == ["A", "B", "C"]
    with pytest.raises(parse.InvalidInputError, match="FORWARD entry"):
        parse.names("A,B C", "FORWARD")


def test_errors_are_sandbox_errors_with_hints():
    err = parse.InvalidInputError("x", 1, "y", "do z")
    assert isinstance(err, SandboxError) and err.hint == "do z" and str(err) == "x must be y, not 1\n  Fix: do z"


@pytest.mark.parametrize(
    "spec, says",
    [
        (SandboxSpec(resources=Resources(cpu=float("nan"))), "cpu must be a finite number"),
        (SandboxSpec(resources=Resources(cpu=-1)), "cpu must be a finite number greater than 0"),
        (SandboxSpec(resources=Resources(memory_mb=-5)), "memory must be a whole number"),
        (SandboxSpec(resources=Resources(gpu=-1)), "gpu must be a whole number"),
        (SandboxSpec(ttl_seconds=float("inf")), "ttl_seconds must be a finite number"),
        (SandboxSpec(ttl_seconds=-1), "ttl_seconds must be a finite number greater than 0"),
        (SandboxSpec(env={"A=B": "1"}), "env name must be a variable name"),
        (SandboxSpec(env={"A": "x\0"}), "without NUL"),
    ],
)
def test_backend_validate_refuses_bad_specs_before_create(spec, says):
    """The facade refuses them for every backend (library callers too), with the backend named."""
    with pytest.raises(parse.InvalidInputError) as err:
        Backend("local").validate(spec)
    assert says in str(err.value) and "backend 'local'" in str(err.value) and "Fix:" in str(err.value)
