"""YAML recipes -> typed dataclass configs, with ``key=value`` overrides from the command line.

    cfg = load_config(GRPOAlignmentConfig, "alignment/grpo/grpo_alignment.yaml", ["beta=0.05"])

Every key is checked against the dataclass: an unknown key (a typo such as ``lamda_lr``) is an error
that names the key, the file it came from and the closest known keys, instead of being silently
ignored for a whole cluster job. Values are checked against the field types; a YAML integer is
accepted where a float is expected. Nested dataclasses take a mapping, and dotted override keys
(``scorer.timeout=30``) reach into them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from alignment.cli import UserError

T = TypeVar("T")
_EXPONENT_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit its dataclass."""


def finite_number(value: Any, where: str) -> float:
    """``value`` as a float when it is a real, finite number (not a bool, not NaN/inf), else a
    ValueError saying ``{where} must be a finite number``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a=1", "b.c=x"]`` -> ``{"a": 1, "b": {"c": "x"}}``; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[leaf] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    passthrough: Collection[str] = (),
) -> T:
    """Build ``cls`` from defaults, then the YAML file at ``path``, then ``overrides``.

    Top-level keys named in ``passthrough`` (e.g. every ``GRPOConfig`` field) are not fields of
    ``cls`` but are accepted into its ``extra`` mapping, for the library that owns them to check.
    """
    values: dict[str, Any] = {}
    if path is not None:
        _merge(values, read_yaml(path), cls, source=str(path), passthrough=passthrough)
    extra = parse_overrides(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
    _merge(values, extra, cls, source="command-line overrides", passthrough=passthrough)
    return _build(cls, values, source=str(path) if path else "command-line overrides")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (for saving next to a run's outputs)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal config."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def _merge(
    into: dict[str, Any], new: Mapping[str, Any], cls: type, source: str, passthrough: Collection[str] = ()
) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in new.items():
        if key not in fields and key in passthrough and "extra" in fields:
            into.setdefault("extra", {})[key] = value
            continue
        if key not in fields:
            near = difflib.get_close_matches(str(key), [*fields, *passthrough], n=3)
            hint = f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else ""
            raise ConfigError(f"unknown key {key!r} in {source} for {cls.__name__}{hint}")
        sub = _dataclass_of(hints[key])
        if sub is not None and isinstance(value, Mapping):
            node = into.setdefault(key, {})
            if not isinstance(node, dict):
                node = into[key] = {}
            _merge(node, value, sub, f"{source} (under {key!r})")
        else:
            into[key] = _coerce(value, hints[key], f"{key!r} in {source}")


def _build(cls: type[T], values: dict[str, Any], source: str) -> T:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        sub = _dataclass_of(hints[key])
        if sub is not None and isinstance(value, dict):
            kwargs[key] = _build(sub, value, f"{source} (under {key!r})")
        elif key == "extra" and isinstance(value, dict):
            kwargs[key] = dict(value)
        else:
            kwargs[key] = value  # checked by _merge
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__} from {source}: {exc}") from exc


def _dataclass_of(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` and convert the few safe cases (int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, where) for v in value]
        return tuple(items) if origin is tuple or tp is tuple else items
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        # a dataclass inside a list (e.g. the models of a sweep): checked key by key like the top level
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        node: dict[str, Any] = {}
        _merge(node, value, tp, where)
        return _build(tp, node, where)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.match(value.strip()):
            return float(value)  # YAML 1.1 reads 5e-6 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def field_help(text: str) -> dict[str, str]:
    """A config field's help line: ``field(default=..., metadata=field_help("..."))``; shown by the
    ``--flag`` that :func:`add_dataclass_args` makes for the field."""
    return {"help": text}


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, exclude: Collection[str] = ()) -> None:
    """Add ``--field`` for every field of ``cls`` but those in ``exclude`` (booleans: ``--field`` /
    ``--no_field``); each flag's help ends with the field's default.

    Only flags given on the command line reach the config (defaults are suppressed), so the order of
    precedence stays: dataclass defaults < YAML file < command-line flags. Values are parsed as YAML
    scalars and type-checked by :func:`load_config`.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _dataclass_of(tp) is not None or f.name in exclude:
            continue
        help_text = f.metadata.get("help", "")
        if not re.search(r"\bdefault\b", help_text, re.IGNORECASE):  # a hand-written one says it better
            help_text = f"{help_text} (default: {_default_text(f)})".lstrip()  # spelt as in the YAML
        help_text = help_text.replace("%", "%%")  # argparse %-formats help texts
        if tp is bool:
            group = parser.add_mutually_exclusive_group()
            group.add_argument(
                f"--{f.name}",
                dest=f.name,
                action="store_const",
                const=True,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            group.add_argument(
                f"--no_{f.name}",
                dest=f.name,
                action="store_const",
                const=False,
                default=argparse.SUPPRESS,
                help=f"sets {f.name} to false",
            )
        else:
            action = parser.add_argument(
                f"--{f.name}",
                dest=f.name,
                type=_yaml_scalar,
                default=argparse.SUPPRESS,
                metavar=f.name.upper(),
                help=help_text,
            )
            action.config_default = _default_value(f)  # what applies when neither flag nor YAML sets it


def _default_value(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _default_text(f: dataclasses.Field) -> str:
    value = _default_value(f)
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def overrides_from_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``--key value`` (or ``--key=value``) that ``parser`` does not define
    rewritten as ``key=value``, for a CLI whose recipe accepts keys it has no flag for (GRPO passes
    any ``GRPOConfig`` field through). A ``--key`` followed by another flag or by nothing is
    ``key=true``. The keys are then checked like any override: an unknown one is a
    :class:`ConfigError` naming it. Tokens after ``--`` are left alone.
    """
    known = parser._option_string_actions  # noqa: SLF001 - argparse has no public lookup by flag
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            out.extend(argv[i:])
            break
        name, eq, inline = token.partition("=")
        if not token.startswith("--") or name in known:
            out.append(token)
            action = known.get(name)
            takes = 0 if action is None or eq else (action.nargs if action.nargs is not None else 1)
            if isinstance(takes, int):  # a known flag's values pass through untouched
                out.extend(argv[i + 1 : i + 1 + takes])
                i += takes
            i += 1
            continue
        key = name[2:]
        if eq:
            out.append(f"{key}={inline}")
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(f"{key}={argv[i + 1]}")
            i += 1
        else:
            out.append(f"{key}=true")
        i += 1
    return out


def _yaml_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def config_from_args(cls: type[T], args: argparse.Namespace, config_path: str | Path | None = None) -> T:
    """The config from defaults, ``config_path`` (YAML) and the flags present in ``args``."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return load_config(cls, config_path, given)
