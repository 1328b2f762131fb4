"""Dataclasses from YAML mappings: typed coercion of each value to its field's annotation, dotted
`key.sub=value` overrides, and errors that name the key and suggest the closest known one.
pipeline.config applies it to the run configuration's schema."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and file) at fault."""


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(known))}."


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert `value` to the annotated type `tp`; raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if tp is Any:
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = args or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def build_dataclass(cls, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            full = f"{prefix}{key}"
            known = [f"{prefix}{n}" for n in names]
            raise ConfigError(f"{source}: unknown key '{full}'.{_suggest(full, known)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value if value is not None else {}, f"{prefix}{key}.", source)
        else:
            kwargs[key] = _coerce(value, tp, f"{source}: '{prefix}{key}'")
    return cls(**kwargs)


def set_dotted(root, tree: dict, dotted: str, value: Any, source: str) -> None:
    """Set `dotted` (a.b.c) in the mapping `tree` that will build dataclass `root`, checking each part."""
    parts = dotted.split(".")
    node = tree
    cls = root
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)] if cls is not None else None
        path = ".".join(parts[: i + 1])
        if names is not None and part not in names:
            known = [".".join(parts[:i] + [n]) for n in names]
            raise ConfigError(f"{source}: unknown key '{path}'.{_suggest(path, known)}")
        tp = _hints(cls)[part] if cls is not None else None
        if i == len(parts) - 1:
            node[part] = value
            return
        if cls is not None and not dataclasses.is_dataclass(tp) and tp is not dict:
            raise ConfigError(f"{source}: '{path}' is a value, not a section; cannot set '{dotted}'")
        node = node.setdefault(part, {})
        if node is None:
            node = tree[part] = {}
        cls = tp if dataclasses.is_dataclass(tp) else None


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from None
    return key, value
