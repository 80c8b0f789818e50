"""arch: nn.Modules only. ``build_model(cfg)`` turns a ``model:`` config mapping into a module."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from . import attention, biformer, bra, dhsa, duo, lm, mlp, norms, pattention, proj  # noqa: F401  (register the built-in blocks)
from .config import LayerContext, to_plain
from .growth import grow
from .io import load_pretrained, save_pretrained
from .registry import FFNS, MIXERS, MODELS, NORMS, PROJS, ConfigError, Registry


def build_model(cfg: Mapping) -> nn.Module:
    """Build the model a ``model:`` config mapping (dict or DictConfig) describes.

    Every key is checked first; an unknown key or name, or an impossible shape, raises ``ConfigError``
    naming the key path and the allowed values.
    """
    cfg = to_plain(cfg)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"model: expected a mapping, got {cfg!r}")
    return MODELS.get(cfg.get("kind", "lm"), "model.kind")(cfg)


__all__ = [
    "build_model",
    "grow",
    "load_pretrained",
    "save_pretrained",
    "ConfigError",
    "Registry",
    "LayerContext",
    "MODELS",
    "MIXERS",
    "FFNS",
    "PROJS",
    "NORMS",
]
