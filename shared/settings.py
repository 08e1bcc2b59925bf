"""Settings from defaults, a TOML file and flags: the one loader behind every console script's settings dataclass.

A settings dataclass (noprop.config.TrainConfig, noprop.federation.FederationConfig) declares each field's type
and default once. From it this module makes the argparse flags, reads a TOML file of the same names (one line per
bad key or type), coerces every value by its declared type (flags, TOML and Flower's run config alike) and layers
defaults < TOML < flags. The standard library does it (dataclasses, argparse, tomllib): no flag or message is
left to a third-party parser's wording.
"""

from __future__ import annotations

import argparse
import math
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, fields
from pathlib import Path


class SettingsError(ValueError):
    """A bad setting (a flag, a TOML key, a run config value, a value out of range); one line naming it."""


@dataclass(frozen=True)
class Flag:
    """How one field appears on the command line, beyond what its type and default say."""

    help: str | None = None
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None  # argparse refuses any other value
    # the values, listed in the help as {a,b,c} but checked by the settings' own validate, so that a flag and a
    # TOML key get the same message
    listed: tuple[str, ...] | None = None
    default: str | None = None  # what the default means, where its value would not say it ("" or 0 for unset)
    metavar: str | None = None  # the placeholder (default: N for whole numbers, X for numbers, VALUE for text)
    negatable: bool = True  # a bool field: --x / --no-x; False: --x alone sets it
    parse: Callable[[str], object] | None = None  # the flag's text -> value (raises argparse.ArgumentTypeError)
    list_as_text: bool = False  # a str field that a TOML list of whole numbers may give, comma-separated


KINDS = (bool, int, float, str, tuple)


@dataclass(frozen=True)
class FieldType:
    """A field's declared type, as far as coercion needs it: bool, int, float, str or a tuple of whole numbers,
    and whether None is allowed (None: the default applies)."""

    kind: type
    optional: bool


def field_type(cls: type, f: Field) -> FieldType:
    """The FieldType of a dataclass field from its annotation (``int``, ``float | None``, ``tuple[int, int]``)."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    optional = type(None) in args
    [base] = [a for a in args if a is not type(None)]
    kind = typing.get_origin(base) or base
    if kind not in KINDS:
        raise TypeError(f"{cls.__name__}.{f.name}: {hint} is not one of bool, int, float, str, tuple[int, ...]")
    return FieldType(kind, optional)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def key_name(field_name: str) -> str:
    """The field's name in TOML files and Flower's run config: kebab-case."""
    return field_name.replace("_", "-")


def field_default(f: Field) -> object:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise TypeError(f"settings field {f.name} has no default")


# ----------------------------------------------------------------------------------------------------------
# One value by its declared type


def _whole_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())


def coerce(kind: FieldType, value: object, where: str, flag: Flag | None = None) -> object:
    """A TOML or run-config value as the field's declared type; SettingsError ``{where} must be ...`` otherwise.
    Whole numbers may come as 3.0 (Flower hands back floats for ints and ints for floats)."""
    if value is None and kind.optional:
        return None
    if kind.kind is bool:
        if isinstance(value, bool):
            return value
        raise SettingsError(f"{where} must be true or false, not {value!r}")
    if kind.kind is int:
        if _whole_number(value):
            return int(value)
        raise SettingsError(f"{where} must be a whole number, not {value!r}")
    if kind.kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise SettingsError(f"{where} must be a number, not {value!r}")
    whole_numbers = isinstance(value, list | tuple) and all(_whole_number(v) for v in value)
    if kind.kind is tuple:
        if whole_numbers:
            return tuple(int(v) for v in value)
        raise SettingsError(f"{where} must be a list of whole numbers like [32, 64, 128], not {value!r}")
    if isinstance(value, str):
        return value
    if flag is not None and flag.list_as_text and whole_numbers:
        return ",".join(str(int(v)) for v in value)
    raise SettingsError(f"{where} must be a string, not {value!r}")


# ----------------------------------------------------------------------------------------------------------
# Flags


def _whole_number_flag(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _number_flag(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _whole_numbers_flag(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated whole numbers, e.g. 32,64,128") from None


FLAG_PARSERS: dict[type, Callable[[str], object]] = {int: _whole_number_flag, float: _number_flag, str: str,
                                                      tuple: _whole_numbers_flag}
METAVARS = {int: "N", float: "X", str: "VALUE", tuple: "N,N,N"}  # one placeholder style: upper case, no underscores


def default_text(value: object) -> str:
    """A default as the help shows it: on/off, numbers as written, text unquoted."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def with_default(text: str | None, shown: str) -> str:
    return f"{text} (default: {shown})" if text else f"default: {shown}"


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, flags: Mapping[str, Flag],
              *, dest_prefix: str = "", show_defaults: bool = False, config_help: str | None = None,
              skip: Sequence[str] = (), defaults: Mapping[str, str] | None = None) -> dict[str, str]:
    """One flag per field of ``cls`` (kebab-case; ``flags`` adds help, aliases, choices), each defaulting to None
    so that only what the user gave overrides; with ``config_help``, ``--config TOML`` too. With
    ``show_defaults``, each help ends with "(default: ...)": ``defaults[name]``, else the Flag's ``default``, else
    the field's value (a None or "" default without either is a TypeError: unset must say what it means).
    Returns {field name: primary flag}."""
    if config_help is not None:
        parser.add_argument("--config", metavar="TOML", default=None, help=config_help)
    made = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        spec, kind = flags.get(f.name, Flag()), field_type(cls, f)
        names = [flag_name(f.name), *spec.aliases]
        help_text = spec.help
        if show_defaults:
            shown = (defaults or {}).get(f.name) or spec.default
            if shown is None:
                value = field_default(f)
                if value is None or value == "":
                    raise TypeError(f"{cls.__name__}.{f.name}: say what its unset default means (Flag.default)")
                shown = default_text(value)
            help_text = with_default(spec.help, shown)
        dest = dest_prefix + f.name
        if kind.kind is bool:
            action = argparse.BooleanOptionalAction if spec.negatable else "store_const"
            extra = {} if spec.negatable else {"const": True}
            parser.add_argument(*names, dest=dest, action=action, default=None, help=help_text, **extra)
        else:
            metavar = spec.metavar or ("{" + ",".join(spec.listed) + "}" if spec.listed else None)
            if metavar is None and not spec.choices:
                metavar = METAVARS[kind.kind]
            parser.add_argument(*names, dest=dest, type=spec.parse or FLAG_PARSERS[kind.kind], default=None,
                                choices=spec.choices, metavar=metavar, help=help_text)
        made[f.name] = names[0]
    return made


def given_flags(args: argparse.Namespace, cls: type, dest_prefix: str = "") -> dict[str, object]:
    """The fields whose flag the user gave (every flag of add_flags defaults to None)."""
    values = {}
    for f in fields(cls):
        value = getattr(args, dest_prefix + f.name, None)
        if value is not None:
            values[f.name] = value
    return values


# ----------------------------------------------------------------------------------------------------------
# TOML files and mappings (Flower's run config)


def read_toml(path: str | os.PathLike, cls: type, table: str, flags: Mapping[str, Flag] = {}) -> dict[str, object]:
    """Settings from a TOML file: field names (dashes or underscores, or a flag's alias) at the top level, in a
    ``[table]`` or in a Flower app's ``[tool.flwr.app.config]``; an unknown key or a value of the wrong type is a
    SettingsError naming the file and key."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise SettingsError(f"config file {path} is a folder: give a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    flower: object = raw
    for key in ("tool", "flwr", "app", "config"):
        flower = flower.get(key) if isinstance(flower, dict) else None
    if isinstance(raw.get(table), dict):
        raw = raw[table]
    elif isinstance(flower, dict):  # a Flower app's pyproject.toml: its run config table
        raw, path = flower, f"{path} [tool.flwr.app.config]"
    elif isinstance(raw.get("tool"), dict):
        raise SettingsError(f"config file {path}: a [tool] table without [tool.flwr.app.config]: put the run "
                            "settings in that table (as in a Flower app's pyproject.toml) or at the top level")
    known = {f.name: f for f in fields(cls)}
    aliases = {alias.lstrip("-").replace("-", "_"): name for name, spec in flags.items() for alias in spec.aliases}
    values: dict[str, object] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        name = aliases.get(name, name)
        if name not in known:
            raise SettingsError(f"config file {path}: unknown key {key!r}; known keys: "
                                f"{', '.join(key_name(n) for n in known)}")
        values[name] = coerce(field_type(cls, known[name]), value, f"config file {path}: key {key!r}",
                              flags.get(name))
    return values


def from_mapping(cls: type, mapping: Mapping[str, object], where: str = "run config") -> dict[str, object]:
    """Field values from a mapping with kebab-case or underscore keys (Flower's run config), coerced by declared
    type; keys the class does not know are ignored (Flower adds none, but apps may carry extras)."""
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name in known:
            values[name] = coerce(field_type(cls, known[name]), value, f"{where} key {key!r}")
    return values


def layered(cls: type, toml_path: str | os.PathLike | None, *layers: Mapping[str, object], table: str,
            flags: Mapping[str, Flag] = {}) -> dict[str, object]:
    """Defaults < the TOML file < each layer in turn (the last: the flags given): the values that override a
    default, by field name."""
    values = read_toml(toml_path, cls, table, flags) if toml_path else {}
    for layer in layers:
        values.update(layer)
    return values
