"""Typed dataclass configs that fill from YAML files, dicts and command-line flags alike.

One shape of config: every setting is declared once, in the section of the component that owns
it, and reused whole:

- shared sections, nested under their own key wherever they are used: ``tokenize``
  (``tokenization.TokenizeConfig``) and ``lora`` (``modeling.LoraSettings``);
- the model every stage loads (``modeling.ModelSettings``: ``model``, ``model_dtype``, ``device``)
  and each stage's own settings (``FeatureSettings``, ``SelectSettings``, ``Schedule``,
  ``EvalSettings``) are base classes: the stage config extends them with its inputs and outputs,
  and ``RunConfig``'s sections *are* those classes, so ``compose`` hands a run's section to a
  stage whole instead of copying it field by field.

Fields carry ``metadata={"help": ...}``; validation lives in ``__post_init__`` and raises
``ConfigError``. A key that was renamed is listed in the class's ``RENAMED`` and refused with a
message naming the new key (YAML and flags alike).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rose_select.errors import ConfigError
from rose_select.io import write_text

T = TypeVar("T")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp, where: str):
    """Convert a YAML/flag value to the annotated type, or raise a ConfigError quoting it."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed (expected {getattr(tp, '__name__', tp)})")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where=where)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict, *, where: str | None = None) -> T:
    """Build ``cls`` from a mapping; unknown keys are an error (typos must not pass silently)."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    renamed = sorted(k for k in data if k in getattr(cls, "RENAMED", {}))
    if renamed:
        raise ConfigError("; ".join(f"{where}.{k} was renamed: use {cls.RENAMED[k]}" for k in renamed))
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def require(checks) -> None:
    """Raise a ConfigError with the message of the first ``(ok, message)`` that does not hold."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def section_fields(section, cls=None) -> dict:
    """The fields of dataclass ``cls`` (default: the section's own class) taken from ``section``,
    values shared, not copied: a section handed on whole."""
    cls = cls or type(section)
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(cls)}


def compose(cls: type[T], *sections, **fields) -> T:
    """``cls`` built from whole sections (dataclass instances, each contributing every field of
    its class) plus explicit ``fields``; a field given twice is an error, not a silent override."""
    values: dict = {}
    for part in (*sections, fields):
        part = part if isinstance(part, dict) else section_fields(part)
        twice = sorted(set(values) & set(part))
        if twice:
            raise TypeError(f"compose({cls.__name__}): {twice} given twice")
        values.update(part)
    return cls(**values)


def to_dict(cfg) -> dict:
    """Plain JSON/YAML-able dict of a config (paths as strings)."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def load_yaml(cls: type[T], path: str | Path, overrides: dict | None = None) -> T:
    """Load a config from YAML, then apply flag overrides (dotted keys allowed: ``warmup.epochs``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" if not path.exists() else
                          f"config file {path} is a directory; give the YAML file inside it")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(cls, data, where=str(path))


def save_yaml(cfg, path: str | Path) -> None:

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def add_arguments(parser: argparse.ArgumentParser, cls, *, prefix: str = "") -> None:
    """Add one ``--flag`` per (nested) field of ``cls``; values stay strings until ``from_dict``."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            add_arguments(parser, tp, prefix=f"{name}.")
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if help_text and default is not None and default != "":
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help strings
        parser.add_argument(flag, dest=name, default=None, help=help_text or None,
                            metavar=name.split(".")[-1].upper())
    for old in getattr(cls, "RENAMED", {}):  # hidden, so the rename error names the new key
        parser.add_argument("--" + f"{prefix}{old}".replace("_", "-"), dest=f"{prefix}{old}",
                            default=None, help=argparse.SUPPRESS)


def flag_overrides(args: argparse.Namespace, cls, *, prefix: str = "") -> dict:
    """The flags actually given on the command line, as a dotted-key dict."""
    out = {}
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.update(flag_overrides(args, tp, prefix=f"{name}."))
        elif getattr(args, name, None) is not None:
            out[name] = getattr(args, name)
    for old in getattr(cls, "RENAMED", {}):
        if getattr(args, f"{prefix}{old}", None) is not None:
            out[f"{prefix}{old}"] = getattr(args, f"{prefix}{old}")
    return out


def nest(flat: dict) -> dict:
    """Turn ``{"a.b": 1}`` into ``{"a": {"b": 1}}``."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def from_args(cls: type[T], args: argparse.Namespace, config_path: str | None = None) -> T:
    """Config from an optional YAML file plus the given flags (flags win)."""
    overrides = flag_overrides(args, cls)
    if config_path:
        return load_yaml(cls, config_path, overrides)
    return from_dict(cls, nest(overrides))
