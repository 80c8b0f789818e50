"""Registries from config names to classes, and the option checker they share.

A block is one class plus one registration line::

    @MIXERS.register("dense")
    class CausalSelfAttention(nn.Module):
        def __init__(self, ctx: LayerContext, *, attn_backend: Literal["auto", "sdpa", "xformers"] = "auto"):
            ...

The keyword-only parameters of ``__init__`` *are* the block's config schema: their names are the allowed
keys, their annotations the allowed types (``Literal[...]`` for a choice), and parameters without a default are
required.  ``Registry.build_spec`` checks a config mapping against that schema and fills in the defaults, so
every config key is validated before anything is built, and every error names the full key path.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type, or describes an impossible shape."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Mapping):
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def check_value(value: Any, tp: Any, path: str) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float, tuple -> list), or raise ConfigError naming ``path``."""
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{path}: {value!r} is not allowed; allowed values: {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return check_value(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} is not allowed; expected {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [check_value(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    type: Any
    default: Any = inspect.Parameter.empty

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


def fields_of_signature(fn: Callable) -> list[Field]:
    """The keyword-only parameters of ``fn`` as config fields."""
    hints = typing.get_type_hints(fn)
    return [
        Field(p.name, hints.get(p.name, Any), p.default)
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]


def fields_of_dataclass(cls: type) -> list[Field]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = inspect.Parameter.empty
        out.append(Field(f.name, hints[f.name], default))
    return out


def check_fields(values: Mapping, fields: list[Field], path: str) -> dict:
    """Check ``values`` against ``fields``: no unknown key, every required key present, every type right.

    Returns a new dict with every field, defaults filled in.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {values!r}")
    allowed = {f.name: f for f in fields}
    unknown = [k for k in values if k not in allowed]
    if unknown:
        raise ConfigError(
            f"{path}.{unknown[0]}: unknown key; allowed keys at {path}: {', '.join(sorted(allowed)) or '(none)'}"
        )
    out = {}
    for f in fields:
        if f.name in values:
            out[f.name] = check_value(values[f.name], f.type, f"{path}.{f.name}")
        elif f.required:
            raise ConfigError(f"{path}.{f.name}: required key is missing (expected {_type_name(f.type)})")
        else:
            out[f.name] = f.default
    return out


def as_spec(value: Any, path: str) -> dict:
    """Normalise a block spec: ``"dense"`` -> ``{"type": "dense"}``; a mapping must have ``type``."""
    if isinstance(value, str):
        return {"type": value}
    if isinstance(value, Mapping):
        if "type" not in value:
            raise ConfigError(f"{path}.type: required key is missing")
        return dict(value)
    raise ConfigError(f"{path}: expected a block name or a mapping with 'type', got {value!r}")


class Registry:
    """Names -> classes for one kind of block (mixer, ffn, proj, norm, model, data source)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            if name in self._classes:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._classes[name] = cls
            cls.registry_name = name
            return cls

        return deco

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str, path: str) -> type:
        if name not in self._classes:
            raise ConfigError(f"{path}: unknown {self.kind} {name!r}; allowed values: {', '.join(self.names())}")
        return self._classes[name]

    def build_spec(self, spec: Any, path: str) -> dict:
        """Validate a spec (name or mapping with ``type``) and return it with every option filled in."""
        spec = as_spec(spec, path)
        cls = self.get(check_value(spec["type"], str, f"{path}.type"), f"{path}.type")
        options = {k: v for k, v in spec.items() if k != "type"}
        return {"type": spec["type"], **check_fields(options, fields_of_signature(cls.__init__), path)}

    def create(self, spec: Mapping, *args: Any, **kwargs: Any) -> Any:
        """Instantiate a spec already checked by ``build_spec``."""
        options = {k: v for k, v in spec.items() if k != "type"}
        return self._classes[spec["type"]](*args, **kwargs, **options)


MODELS = Registry("model kind")
MIXERS = Registry("mixer")
FFNS = Registry("ffn")
PROJS = Registry("projection")
NORMS = Registry("norm")
