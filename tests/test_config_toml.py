"""The TOML writer: whatever a run records in config.toml must read back as the same value."""

from __future__ import annotations

import math
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvformers.config import ConfigError, dumps_toml, load_toml, save_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Any Unicode scalar value (no lone surrogates: they have no UTF-8 form), control characters included.
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
scalars = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), text,
)
values = st.one_of(scalars, st.lists(scalars, max_size=4))
tables = st.recursive(
    st.dictionaries(text, values, max_size=4),
    lambda inner: st.dictionaries(text, st.one_of(values, inner), max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(tables)
def test_round_trip_of_random_tables(data):
    assert tomllib.loads(dumps_toml(data)) == data


def test_control_characters_in_a_data_path_round_trip(tmp_path):
    data = {"data": {"name": "folder:/tmp/a\x01b\x7f\"c\\d\ne"}, "train": {"lr": float("inf")}}
    save_toml(data, tmp_path / "config.toml")
    back = load_toml(tmp_path / "config.toml")
    assert back["data"] == data["data"] and math.isinf(back["train"]["lr"])


def test_unwritable_values_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="not valid Unicode"):
        dumps_toml({"data": {"name": "folder:/tmp/\udcff"}})
    with pytest.raises(ConfigError, match="64-bit"):
        dumps_toml({"seed": 2**64})


def test_invalid_utf8_config_is_a_config_error(tmp_path):
    (tmp_path / "c.toml").write_bytes(b'[train]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_toml(tmp_path / "c.toml")
