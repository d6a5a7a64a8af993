"""Typed configuration from YAML: a loader that refuses duplicate keys, and dataclasses built from
mappings with every value checked against its field's annotation.

    tree = read_yaml_mapping(path, label="recipe", error=MyError)   # {} for an empty file
    apply_overrides(tree, ["optim.lr=3e-4"], error=MyError)         # dotted key=value (optional)
    cfg = build_dataclass(MyConfig, tree, error=MyError, file=f"recipe {path}")

Every error is an instance of `error` (a `TypedConfigError` subclass, or any ValueError subclass
taking one message) whose text names the dotted field (`optim.lr`, `tasks[2].weight`) and, when
`file` is given, the file; the `field` and `file` attributes carry them too. Without `file` the
texts are those of hycam_ds.engine.train_config's loader, which this one can replace.

What an annotation accepts:

    bool                  true or false only (not "no", 0 or 1)
    int                   an integer (not a bool, not 2.0)
    float                 a finite number; text only when it spells one (YAML 1.1 reads 5e-4 as text)
    str                   text only
    Literal[a, b]         one of the values listed (of the same type: true is not 1)
    Optional[X], X | Y    None where allowed, else the first option that fits
    list[X], tuple[X, ...], tuple[X, Y]   a YAML list (tuple fields get tuples)
    dict[K, V]            a mapping, keys and values checked
    a dataclass           a mapping, built recursively: unknown keys and missing required keys are errors
    Any, bare list/dict   anything / any list / any mapping
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class TypedConfigError(ValueError):
    """A configuration value that does not fit its dataclass; the message names the dotted field and the file."""

    field: str = ""
    """The dotted field path (`tokenizer.vocab_size`, `tasks[0].sources`), or "" for the whole file."""
    file: typing.Optional[str] = None
    """The file as the message names it (`recipe r.yaml`), when known."""


def _error(error: type[Exception], message: str, field: str = "", file: str | None = None) -> Exception:
    err = error(f"{file}: {message}" if file else message)
    err.field, err.file = field, file
    return err


# ----------------------------------------------------------------------------- YAML
class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping repeating a key is an error (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may override: not a duplicate
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    line = first.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: the base loader says so
                    continue
                if line != key_node.start_mark.line + 1:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, line)
        return super().construct_mapping(node, deep)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(key, line, first)
        self.key, self.line, self.first = key, line, first


def load_yaml_text(text: str) -> Any:
    """YAML text -> Python objects (safe types only); a repeated key raises `yaml.YAMLError`."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as dup:
        raise yaml.YAMLError(f"duplicate key {dup.key!r} at line {dup.line} (first at line {dup.first})") from None


def read_yaml_mapping(
    path: str | os.PathLike, label: str = "config", error: type[Exception] = TypedConfigError
) -> dict[str, Any]:
    """The YAML file at `path` as a mapping ({} for an empty file). Errors read `{label} {path}: ...`:
    no such file, not a file, unreadable, not UTF-8, invalid YAML (one line, with its line number),
    a duplicate key (naming the key and both lines), and a top level that is not a mapping."""
    path = Path(path)
    where = f"{label} {path}"
    if not path.exists():
        raise _error(error, "no such file", file=where)
    if not path.is_file():
        raise _error(error, "not a file", file=where)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _error(error, f"not UTF-8 text (byte {err.start})", file=where) from None
    except OSError as err:
        raise _error(error, f"cannot read it: {err.strerror or err}", file=where) from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as dup:
        raise _error(
            error,
            f"duplicate key {dup.key!r} at line {dup.line} (first at line {dup.first}); "
            "YAML would silently keep only the last one",
            field=str(dup.key),
            file=where,
        ) from None
    except yaml.YAMLError as err:
        raise _error(error, f"invalid YAML: {' '.join(str(err).split())}", file=where) from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise _error(error, f"expected a mapping at the top level, got a {type(tree).__name__}", file=where)
    return tree


# ----------------------------------------------------------------------------- key=value overrides
def parse_override(text: str, error: type[Exception] = TypedConfigError) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 3e-4): the value is read as YAML (text when it is not)."""
    if "=" not in text:
        raise _error(error, f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part.isidentifier() for part in key.split(".")):
        raise _error(error, f"override {text!r}: {key!r} is not a dotted field name")
    try:
        value = load_yaml_text(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: typing.Iterable[str], error: type[Exception] = TypedConfigError):
    """Set every `key=value` of `overrides` in `tree` (nested dicts, created as needed); returns `tree`."""
    for text in overrides:
        path, value = parse_override(text, error)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise _error(error, f"override {'.'.join(path)}: {part} is not a group", field=".".join(path))
            node = child
        node[path[-1]] = value
    return tree


# ----------------------------------------------------------------------------- dataclasses
def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _fits_literal(value: Any, allowed: tuple) -> bool:
    return any(value == a and type(value) is type(a) for a in allowed)


def coerce(value: Any, tp: Any, where: str, error: type[Exception] = TypedConfigError, file: str | None = None) -> Any:
    """`value` checked against the annotation `tp` (see the module docstring), converted where the
    annotation says so (an int for a float, a list for a tuple); otherwise an `error` naming `where`."""

    def fail(message: str) -> Exception:
        return _error(error, message, where, file)

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # already built (check_fields on an instance)
            return value
        return build_dataclass(tp, value, where, error=error, file=file)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [o for o in args if o is not type(None)]
        if len(options) == 1:
            return coerce(value, options[0], where, error, file)
        for option in options:
            try:
                return coerce(value, option, where, error, file)
            except error:  # this option does not fit: try the next
                pass
        raise fail(f"{where}: expected {' or '.join(type_name(o) for o in options)}, got {value!r}")
    if origin is Literal:
        if not _fits_literal(value, args):
            raise fail(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise fail(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(coerce(v, t, f"{where}[{i}]", error, file) for i, (v, t) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, f"{where}[{i}]", error, file) for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, value_tp = args if args else (Any, Any)
        return {
            coerce(k, key_tp, f"{where} key {k!r}", error, file): coerce(v, value_tp, f"{where}.{k}", error, file)
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise fail(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise fail(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail(f"{where}: expected a string, got {value!r}")
        return value
    raise fail(f"{where}: unsupported type {type_name(tp)}")


def build_dataclass(
    cls: type,
    values: Any,
    where: str = "",
    *,
    error: type[Exception] = TypedConfigError,
    file: str | None = None,
) -> Any:
    """`cls(**values)` with every value checked by `coerce`; unknown keys (with the closest known
    one) and missing required keys are errors naming the dotted field. A ValueError of the class's
    own `__post_init__` is re-raised as `error`, prefixed with `where`."""
    if not isinstance(values, dict):
        raise _error(error, f"{where or 'config'}: expected a mapping, got {values!r}", where, file)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(values) - set(fields), key=str)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else ""
        raise _error(
            error,
            f"unknown key {prefix}{unknown[0]} (known in {where or 'the top level'}: {sorted(fields)}){hint}",
            f"{prefix}{unknown[0]}",
            file,
        )
    missing = [
        name
        for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise _error(error, f"missing key {prefix}{missing[0]} (required in {where or 'the top level'})", where, file)
    kwargs = {name: coerce(value, hints[name], f"{prefix}{name}", error, file) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:  # the class's own checks name their field
        if isinstance(err, error):
            raise
        raise _error(error, _in_section(str(err), cls.__name__, where), where, file) from None


def _in_section(message: str, class_name: str, where: str) -> str:
    """A dataclass's own error message as the user wrote the key: "HyCAMConfig.tau=0.0: ..." in the
    section hycam becomes "hycam.tau=0.0: ...", "HyCAMConfig: ..." becomes "hycam: ..."."""
    if not where:
        return message
    for own, ours in ((f"{class_name}.", f"{where}."), (f"{class_name}: ", f"{where}: ")):
        if message.startswith(own):
            return ours + message[len(own) :]
    return f"{where}: {message}"


def check_fields(obj: Any, error: type[Exception] = TypedConfigError, file: str | None = None) -> None:
    """Check (and convert in place) every field of the dataclass instance `obj` against its annotation:
    for dataclasses built in Python (`__post_init__`) rather than from a mapping."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, coerce(getattr(obj, f.name), hints[f.name], f.name, error, file))
