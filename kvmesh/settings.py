"""Every service's settings in one place: a frozen dataclass per service, filled from command-line
flags whose defaults come from KVMESH_<SERVICE>_<FIELD> environment variables, then the field's own
default. A field's `metadata={"help": ...}` is its flag's help."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from typing import Any, TypeVar

from kvmesh.errors import InvalidArgument

T = TypeVar("T")


def doc(text: str) -> dict[str, str]:
    """A settings field's flag help: `field(default=..., metadata=doc("..."))`."""
    return {"help": text}


def check_port(name: str, value: int, low: int = 0) -> None:
    """A TCP port setting: low..65535 (a larger one would wrap around in the socket layer)."""
    if not low <= value <= 65535:
        raise InvalidArgument(f"{name} must be a port number from {low} to 65535, not {value}")


def check_ports(config: Any) -> None:
    """A service config's `port` (0: any free one) and `metrics_port` (-1: none)."""
    check_port("port", config.port)
    check_port("metrics_port", config.metrics_port, low=-1)


def _base(hint: Any) -> Any:
    """Path | None -> Path; tuple[str, ...] stays a tuple hint."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _from_env(raw: str, hint: Any) -> Any:
    base = _base(hint)
    if typing.get_origin(base) is tuple:
        return tuple(json.loads(raw)) if raw.startswith("[") else (raw,)
    if base is bool:
        return raw.lower() in ("1", "true", "yes", "on")
    return base(raw)


def add_flags(
    parser: argparse.ArgumentParser, cls: type[Any], env_prefix: str, skip: frozenset[str] = frozenset()
) -> None:
    """skip: fields another settings class gave this parser already (a worker's shared ones)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint, env = hints[f.name], f"KVMESH_{env_prefix}_{f.name.upper()}"
        default = f.default  # every settings field has a plain default
        if env in os.environ:
            default = _from_env(os.environ[env], hint)
        flag, help_text = "--" + f.name.replace("_", "-"), f"{f.metadata.get('help', '')} (env {env})"
        base = _base(hint)
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(base) is tuple:
            parser.add_argument(flag, action="append", default=None, help=help_text + ", repeatable")
            parser.set_defaults(**{f"{f.name}_default": default})
        else:
            parser.add_argument(flag, type=base, default=default, help=help_text)


def build(cls: type[T], ns: argparse.Namespace) -> T:
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(ns, f.name)
        if value is None and hasattr(ns, f"{f.name}_default"):
            value = getattr(ns, f"{f.name}_default")
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)
