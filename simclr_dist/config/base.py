"""What every job's configuration shares: the flag helper, the one validator, and the one error type.

Why: a bad input must fail before any Ray resources are claimed, with one line naming the flag. Each config is a
dataclass whose fields carry their help text and their simple rules (``choices``, bounds) in the field metadata;
:func:`check_fields` enforces those for every config the same way, and a config's own ``check()`` adds only the
rules that relate two fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import field
from typing import Any, TypeVar

from simclr_dist.console import CommandParser

T = TypeVar("T", bound="JobConfig")
Choices = Iterable[str] | Callable[[], Iterable[str]]


class ConfigError(ValueError):
    """Bad input (a flag, a flag combination, a file named by a flag); the message is one line naming it."""


FORMATS: tuple[str, ...] = ("simclr-v1", "spijkervet", "torchvision", "simclr-dist")


class PretrainedError(ConfigError):
    """A weight file cannot be imported (bad spec, unreadable, wrong layout, partial under --strict); one line."""


def parse_weights_spec(spec: str) -> tuple[str, str]:
    """``"simclr-v1:/w/r50-2x.pth"`` -> ``("simclr-v1", "/w/r50-2x.pth")``; URIs keep their ``s3://``."""
    fmt, sep, path = spec.partition(":")
    fmt = fmt.strip().lower()
    if not sep or not path.strip():
        raise PretrainedError(f"--pretrained {spec!r}: expected FORMAT:PATH_OR_URI with FORMAT one of "
                              f"{', '.join(FORMATS)}")
    if fmt not in FORMATS:
        raise PretrainedError(f"--pretrained {spec!r}: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return fmt, path.strip()


def flag(default: Any, help: str, *, choices: Choices | None = None, what: str = "value", ge: float | None = None,
         gt: float | None = None, le: float | None = None, **kw: Any) -> Any:
    """A dataclass field that is also a command-line flag (``--field-name``) with this help text, and the simple
    rules :func:`check_fields` enforces: ``choices`` (a tuple, or a function returning one, ``what`` names the
    kind of value in the error) and bounds ``ge``/``gt``/``le`` (``None`` values are "use the default": skipped)."""
    rules = {"choices": choices, "what": what, "ge": ge, "gt": gt, "le": le}
    return field(default=default, metadata={"help": help, **{k: v for k, v in rules.items() if v is not None}, **kw})


def internal(default: Any, help: str) -> Any:
    """A config field the job sets itself (recorded in the run's config, no command-line flag)."""
    return field(default=default, metadata={"help": help, "cli": False})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def bad(name: str, msg: str) -> typing.NoReturn:
    """Raise the one-line error of field ``name``."""
    raise ConfigError(f"{flag_name(name)}: {msg}")


def check_fields(cfg: Any) -> None:
    """Enforce every field's ``choices`` and bounds; the first violation raises :class:`ConfigError`."""
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None or isinstance(value, bool):
            continue
        choices = meta.get("choices")
        if choices is not None:
            options = tuple(choices() if callable(choices) else choices)
            if value not in options:
                bad(f.name, f"unknown {meta.get('what', 'value')} {value!r}; choose from {', '.join(options)}")
        if isinstance(value, (int, float)):
            if isinstance(value, float) and not math.isfinite(value) and any(k in meta for k in ("ge", "gt", "le")):
                bad(f.name, f"must be finite, got {value}")
            if "gt" in meta and not value > meta["gt"]:
                bad(f.name, f"must be > {meta['gt']:g}, got {value}")
            if "ge" in meta and not value >= meta["ge"]:
                bad(f.name, f"must be >= {meta['ge']:g}, got {value}")
            if "le" in meta and not value <= meta["le"]:
                bad(f.name, f"must be <= {meta['le']:g}, got {value}")


def check_plain_name(name: str | None, field_name: str = "name") -> None:
    """A run name is one directory level: no slash, not hidden, not empty."""
    if name is not None and (not name or "/" in name or name.startswith(".")):
        bad(field_name, f"must be a plain directory name, got {name!r}")


def is_uri(path: str) -> bool:
    return "://" in path


class JobConfig:
    """Mixin of every job's dataclass: ``validate()`` (field rules, then the class's own ``check()``),
    ``to_dict``/``from_dict`` (tolerant of keys from other versions, so an old checkpoint's config still loads)."""

    def check(self) -> None:
        """Rules that relate several fields; subclasses override."""

    def validate(self: T) -> T:
        check_fields(self)
        self.check()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------- CLI generation
def base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of ``X | None``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def build_parser(cls: type, prog: str, description: str, *, one_line: bool = False) -> argparse.ArgumentParser:
    """One flag per dataclass field (``--batch-size``), typed, with the field's help and default. ``one_line``:
    a bad flag raises :class:`ConfigError` instead of argparse's usage text and exit."""
    def raise_config_error(line: str) -> typing.NoReturn:
        raise ConfigError(line)

    parser = CommandParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           on_error=raise_config_error if one_line else None)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp, _ = base_type(hints[f.name])
        helptext = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=helptext)
        else:
            parser.add_argument(flag_name(f.name), dest=f.name, type=tp, default=f.default, help=helptext,
                                metavar=f.name.upper())
    return parser


def parse_into(cls: type[T], argv: list[str] | None, prog: str, description: str, *, one_line: bool = False) -> T:
    """Parse ``argv`` into a ``cls`` (not validated yet: the command validates before its first side effect)."""
    return cls(**vars(build_parser(cls, prog, description, one_line=one_line).parse_args(argv)))
