from dataclasses import dataclass, field

import pytest

from cvformers.config import ConfigError, dumps_toml, from_dict, to_dict
from cvformers.config import tomllib


@dataclass
class Inner:
    width: int = 4  # a width
    names: tuple[str, ...] = ("a", "b")


@dataclass
class Outer:
    lr: float = 1e-3
    steps: int = 10
    mode: str = "x"
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="lrr"):
        from_dict(Outer, {"lrr": 1.0})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="steps"):
        from_dict(Outer, {"steps": "ten"})
    with pytest.raises(ConfigError, match="inner.width"):
        from_dict(Outer, {"inner": {"width": 1.5}})


def test_int_promotes_to_float_but_bool_is_not_int():
    assert from_dict(Outer, {"lr": 1}).lr == 1.0
    with pytest.raises(ConfigError):
        from_dict(Outer, {"steps": True})


def test_toml_round_trip():
    cfg = Outer(lr=0.5, inner=Inner(width=7, names=("q",)), maybe=3)
    text = dumps_toml({"kind": "k", "model": to_dict(cfg)})
    back = tomllib.loads(text)
    assert back["kind"] == "k"
    assert from_dict(Outer, back["model"]) == cfg
