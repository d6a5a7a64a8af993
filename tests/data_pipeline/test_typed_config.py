"""typed_config: YAML without duplicate keys, dataclasses from mappings with every value checked, and
the errors naming the dotted field and the file; able to stand in for the train config's loader."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

import pytest

from data_pipeline.typed_config import (
    TypedConfigError,
    apply_overrides,
    build_dataclass,
    check_fields,
    read_yaml_mapping,
)


@dataclasses.dataclass
class Inner:
    rate: float = 0.5
    names: list[str] = dataclasses.field(default_factory=lambda: ["a"])


@dataclasses.dataclass
class Outer:
    name: str
    steps: int = 3
    flag: bool = False
    mode: Literal["fast", "slow"] = "fast"
    limit: Optional[int] = None
    pair: tuple[float, float] = (0.9, 0.99)
    sizes: tuple[int, ...] = ()
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    either: int | str = 0
    inner: Inner = dataclasses.field(default_factory=Inner)
    items: list[Inner] = dataclasses.field(default_factory=list)
    extra: Any = None

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"Outer.steps={self.steps}: expected >= 0")


def build(values, **kw):
    return build_dataclass(Outer, values, **kw)


def test_values_are_checked_and_converted():
    cfg = build(
        {
            "name": "x",
            "steps": 5,
            "flag": True,
            "mode": "slow",
            "limit": None,
            "pair": [1, "5e-4"],
            "sizes": [1, 2],
            "weights": {"a": 1},
            "either": "text",
            "inner": {"rate": 2, "names": ["p", "q"]},
            "items": [{"rate": 0.1}, {}],
            "extra": {"anything": [1]},
        }
    )
    assert cfg.pair == (1.0, 5e-4) and isinstance(cfg.pair, tuple) and cfg.sizes == (1, 2)
    assert cfg.weights == {"a": 1.0} and isinstance(cfg.weights["a"], float)
    assert cfg.inner == Inner(2.0, ["p", "q"]) and cfg.items == [Inner(0.1), Inner()]
    assert cfg.either == "text" and build({"name": "x", "either": 4}).either == 4


BAD = [
    ({"name": "x", "steps": "lots"}, "steps: expected an integer, got 'lots'"),
    ({"name": "x", "steps": 2.0}, "steps: expected an integer"),
    ({"name": "x", "steps": True}, "steps: expected an integer"),
    ({"name": "x", "flag": "no"}, "flag: expected true/false, got 'no'"),
    ({"name": "x", "flag": 1}, "flag: expected true/false"),
    ({"name": "x", "mode": "medium"}, "mode: 'medium' is not one of ['fast', 'slow']"),
    ({"name": "x", "limit": "3"}, "limit: expected an integer"),
    ({"name": "x", "pair": [1]}, "pair: expected 2 values"),
    ({"name": "x", "pair": "0.9"}, "pair: expected a list"),
    ({"name": "x", "pair": [0.9, float("nan")]}, "pair[1]: expected a finite number"),
    ({"name": "x", "pair": [0.9, "inf"]}, "pair[1]: expected a finite number"),
    ({"name": "x", "weights": {"a": "heavy"}}, "weights.a: expected a number"),
    ({"name": "x", "weights": [1]}, "weights: expected a mapping"),
    ({"name": "x", "either": 1.5}, "either: expected int or str"),
    ({"name": "x", "inner": {"rate": "x"}}, "inner.rate: expected a number"),
    ({"name": "x", "inner": {"names": ["a", 3]}}, "inner.names[1]: expected a string"),
    ({"name": "x", "inner": 3}, "inner: expected a mapping"),
    ({"name": "x", "items": [{}, {"rat": 1}]}, "unknown key items[1].rat (known in items[1]: ['names', 'rate'])"),
    ({"name": "x", "stpes": 1}, "unknown key stpes"),
    ({"steps": 1}, "missing key name"),
    ({"name": 5}, "name: expected a string, got 5"),
    ({"name": "x", "steps": -1}, "Outer.steps=-1: expected >= 0"),
]


@pytest.mark.parametrize("values,message", BAD, ids=[m for _, m in BAD])
def test_a_bad_value_names_its_dotted_field(values, message):
    with pytest.raises(TypedConfigError) as err:
        build(values)
    assert message in str(err.value)


def test_errors_name_the_file_and_carry_field_and_file():
    with pytest.raises(TypedConfigError) as err:
        build({"name": "x", "inner": {"rate": "x"}}, file="recipe r.yaml")
    assert str(err.value) == "recipe r.yaml: inner.rate: expected a number, got 'x'"
    assert (err.value.field, err.value.file) == ("inner.rate", "recipe r.yaml")
    with pytest.raises(TypedConfigError, match=r"did you mean steps\?"):
        build({"name": "x", "stpes": 1})


def test_the_error_class_is_the_callers():
    class MyError(ValueError):
        pass

    class SubError(TypedConfigError):
        pass

    with pytest.raises(MyError, match="steps: expected an integer"):
        build({"name": "x", "steps": "x"}, error=MyError)
    with pytest.raises(SubError):  # a union's options are tried with the caller's class too
        build({"name": "x", "either": 1.5}, error=SubError)
    with pytest.raises(MyError, match="missing key name"):
        build({}, error=MyError)


def test_check_fields_checks_an_instance_built_in_python():
    cfg = Outer(name="x")
    cfg.pair = [1, 2]
    check_fields(cfg)
    assert cfg.pair == (1.0, 2.0)
    cfg.flag = "yes"
    with pytest.raises(TypedConfigError, match="flag: expected true/false"):
        check_fields(cfg, file="Outer")


def test_yaml_refuses_duplicate_keys_naming_key_and_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1\nname: x\noptim:\n  lr: 2\n")
    with pytest.raises(TypedConfigError) as err:
        read_yaml_mapping(path, label="--config")
    assert str(err.value) == (
        f"--config {path}: duplicate key 'optim' at line 4 (first at line 1); "
        "YAML would silently keep only the last one"
    )
    path.write_text("optim:\n  lr: 1\n  wd: 0\n  lr: 2\n")
    with pytest.raises(TypedConfigError, match="duplicate key 'lr' at line 4 \\(first at line 2\\)"):
        read_yaml_mapping(path)
    path.write_text("base: &b {lr: 1, wd: 0}\noptim:\n  <<: *b\n  lr: 2\n")  # a merge key may be overridden
    assert read_yaml_mapping(path)["optim"] == {"lr": 2, "wd": 0}


def test_yaml_file_errors_are_one_line(tmp_path):
    with pytest.raises(TypedConfigError, match="recipe .*nope.yaml: no such file"):
        read_yaml_mapping(tmp_path / "nope.yaml", label="recipe")
    with pytest.raises(TypedConfigError, match="not a file"):
        read_yaml_mapping(tmp_path, label="recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(TypedConfigError, match="invalid YAML") as err:
        read_yaml_mapping(bad)
    assert "\n" not in str(err.value) and "line" in str(err.value)
    bad.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(TypedConfigError, match="not UTF-8"):
        read_yaml_mapping(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(TypedConfigError, match="expected a mapping at the top level, got a list"):
        read_yaml_mapping(bad)
    bad.write_text("")
    assert read_yaml_mapping(bad) == {}


def test_overrides_set_dotted_keys():
    tree = apply_overrides({"inner": {"rate": 1.0}}, ["inner.names=[x, y]", "steps=7", "name=n"])
    assert build(tree) == Outer(name="n", steps=7, inner=Inner(1.0, ["x", "y"]))
    with pytest.raises(TypedConfigError, match="is not key=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(TypedConfigError, match="is not a dotted field name"):
        apply_overrides({}, ["a..b=1"])
    with pytest.raises(TypedConfigError, match="override steps.x: steps is not a group"):
        apply_overrides({"steps": 1}, ["steps.x=1"])
