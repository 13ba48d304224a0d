"""Experiment YAML onto frozen dataclasses, with dotted command-line overrides.

    cfg = load_config(CurateConfig, "configs/curate-demo.yaml", ["minhash.bands=14", "sources.0.count=500"])

Overrides index into lists by position or by an item's name (`sources.0.count=500`, `sources.bios.count=500`);
this is the one override parser of looplm (experiments and every per-step command use it).

The YAML's keys must be fields of the dataclass (nested dataclasses are nested mappings); an unknown key, a
value of the wrong type or a malformed override is an error that names the file and the dotted field.
Values are converted to the field's annotated type: int, float, bool, str, tuple/list of those, Optional,
and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigFileError(ValueError):
    """A config file or override that does not fit its dataclass; the message names where."""


class PathError(ValueError):
    """A file or folder given to a command that is not what the command needs (missing, the wrong kind, in use);
    the message names the path."""


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, where)
            except ConfigFileError as err:
                errors.append(str(err))
        raise ConfigFileError(errors[0] if errors else f"{where}: cannot be null")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigFileError(f"{where}: expected a mapping for {annotation.__name__}, got {value!r}")
        return _build(annotation, value, where)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigFileError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigFileError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            item_type = args[0] if args else Any
            items = [_convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigFileError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigFileError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigFileError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads 1e-3, without a dot, as a string; YAML 1.2 as a number
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigFileError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigFileError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigFileError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    kwargs = {name: _convert(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigFileError(f"{where}: {err}") from None


def _parse_override(override: str) -> tuple[list[str], Any]:
    key, sep, raw = override.partition("=")
    parts = key.split(".")
    if not sep or not key or not all(parts):
        raise ConfigFileError(f"override {override!r} is not of the form dotted.key=value")
    return parts, yaml.safe_load(raw)


def _list_index(items: list, part: str, override: str, where: str) -> int:
    """A list item by position (`sources.0`) or by its `name` field (`sources.bios`)."""
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            raise ConfigFileError(f"override {override!r}: {where} has {len(items)} items, no item {index}")
        return index % len(items)
    named = [i for i, item in enumerate(items) if isinstance(item, dict) and item.get("name") == part]
    if not named:
        names = [str(item.get("name")) for item in items if isinstance(item, dict) and "name" in item]
        raise ConfigFileError(
            f"override {override!r}: {where} has no item named {part!r}"
            + (f" (names: {', '.join(names)})" if names else " (its items have no names: use a position)")
        )
    return named[0]


def apply_overrides(
    data: dict[str, Any], overrides: list[str], defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Dotted overrides onto plain data: 'a.b=3' sets data['a']['b'] = 3; a part that meets a list picks an item
    by position or by name ('sources.0.count=500', 'sources.bios.count=500'). Values are parsed as YAML (3, 0.5,
    true, [x, y]). A list the data does not hold yet is taken from `defaults` (the config's default values) so
    that one of its items can be changed. The input is not modified."""
    import copy

    result = copy.deepcopy(data)
    for override in overrides:
        parts, value = _parse_override(override)
        node: Any = result
        default: Any = defaults
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[:depth]) or "the top level"
            if isinstance(node, list):
                index = _list_index(node, part, override, where)
                if last:
                    node[index] = value
                    break
                default = None
                child = node[index]
                if not isinstance(child, dict | list):
                    child = node[index] = {}
                node = child
                continue
            if not isinstance(node, dict):
                raise ConfigFileError(f"override {override!r}: {where} is not a mapping or a list")
            default = default.get(part) if isinstance(default, dict) else None
            if last:
                node[part] = value
                break
            child = node.get(part)
            if child is None and isinstance(default, list | tuple):  # asdict keeps a tuple field a tuple
                child = copy.deepcopy(list(default))
            elif not isinstance(child, dict | list):
                child = {}
            node[part] = child
            node = child
    return result


def build_config(cls: type[T], data: dict[str, Any], where: str) -> T:
    """`cls` from plain data; errors name `where` (a file, or a file and a field) and the dotted field."""
    if not isinstance(data, dict):
        raise ConfigFileError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    return _build(cls, data, where)


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a non-empty mapping; errors name the file and what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigFileError(f"{what} {path} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigFileError(f"{what} {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{path} is not valid YAML: {err}") from None
    if data is None:  # an empty file would silently mean "every default"
        raise ConfigFileError(f"{path} is empty; write the fields to set (an empty mapping `{{}}` keeps the defaults)")
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: the top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from a YAML file (or its defaults when path is None) plus dotted overrides."""
    data: dict[str, Any] = {}
    where = cls.__name__
    if path is not None:
        data, where = read_yaml_mapping(path), str(path)
    try:
        defaults = to_dict(cls())
    except (TypeError, ValueError):  # a config without complete defaults: lists must then come from the file
        defaults = None
    return _build(cls, apply_overrides(data, overrides or [], defaults), where)


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain data (for logging as params, hashing, or writing back to YAML)."""
    return dataclasses.asdict(config)
