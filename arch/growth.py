"""TokenFormer progressive scaling (Sec. 3.5): grow a model by appending parameter tokens to every Pattention.

``grow(model, scale=2)`` multiplies every Pattention's token count (``slots={"qkv": .., "proj": .., "ffn": ..}``
sets them per role instead). Old tokens are copied, new keys are zero and new values random, so the grown
model computes the same function (the new scores are GeLU(0) = 0 exactly; only the summation order of the
wider matmuls changes, so outputs agree to rounding: ~1e-15 relative in float64, ~1e-6 in float32 on weights
of trained scale, see tests/arch/test_pattention.py) while its new tokens receive gradient.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

from .config import parse_layer_selector, resolve_lm_config
from .pattention import Pattention
from .registry import ConfigError

# where each role's token count lives in a block spec, and its default when the spec leaves it None
ROLE_KEYS = {"qkv": ("proj", "qkv_tokens"), "proj": ("proj", "proj_tokens"), "ffn": ("ffn", "n_tokens")}


def _default_tokens(role: str, d_model: int) -> int:
    return 4 * d_model if role == "ffn" else d_model


def grow(model: nn.Module, scale: Optional[float] = 2.0, slots: Optional[dict] = None, seed: int = 0) -> nn.Module:
    """A grown copy of ``model`` (the input is left untouched). Either ``scale`` >= 1 multiplies every token
    count (rounded), or ``slots`` gives the new count per role (``qkv``, ``proj``, ``ffn``)."""
    if slots is None and (scale is None or scale < 1):
        raise ConfigError(f"grow: scale must be >= 1 (got {scale}); or pass slots={{'qkv': n, 'proj': n, 'ffn': n}}")
    if slots is not None and set(slots) - set(ROLE_KEYS):
        raise ConfigError(
            f"grow: slots: unknown roles {sorted(set(slots) - set(ROLE_KEYS))}; allowed: {', '.join(ROLE_KEYS)}"
        )
    pattentions = [m for m in model.modules() if isinstance(m, Pattention)]
    if not pattentions:
        raise ConfigError(
            "grow: this model has no Pattention to grow (use proj: pattention and/or ffn: {type: pattention})"
        )

    def new_count(role: str, n: int) -> int:
        if slots is not None:
            return int(slots.get(role, n))
        return int(round(n * scale))

    cfg = grown_config(model.config, new_count)
    grown = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for m in (m for m in grown.modules() if isinstance(m, Pattention)):
        m.grow_(new_count(m.role, m.n_tokens), generator=gen)
    resolved = resolve_lm_config(cfg)
    grown.config = {k: v for k, v in resolved.items() if k != "per_layer"}
    grown.per_layer = resolved["per_layer"]

    from . import build_model  # the new config must describe exactly the grown model

    with torch.device("meta"):
        ref = build_model(grown.config)
    got = {k: tuple(v.shape) for k, v in grown.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if got != want:  # pragma: no cover - a bug in the config rewrite below
        raise RuntimeError(f"grown model and its config disagree: {set(got.items()) ^ set(want.items())}")
    return grown


def grown_config(config: dict, new_count: Callable[[str, int], int]) -> dict:
    """The config of the grown model: every Pattention token count n, wherever the config places it (base block,
    per-layer override with or without an explicit count), becomes ``new_count(role, n)``.

    A spec's count is rewritten where it is explicit. A spec that makes a block a Pattention without a count
    gets the grown default, except where it only updates a block that is already a Pattention (then the count
    it inherits is rewritten where that one is set)."""
    cfg = copy.deepcopy(config)
    d, n_layers = cfg["d_model"], cfg["n_layers"]
    for role, (block, key) in ROLE_KEYS.items():
        for j, (sel, spec) in enumerate([(None, cfg)] + list(cfg["layers"].items())):
            s = spec.get(block)
            if s is None:
                continue
            if key in s and s[key] is not None:
                s[key] = new_count(role, s[key])
                continue
            if j == 0:  # the base block: its count is the default unless given
                if s["type"] == "pattention":
                    s[key] = new_count(role, _default_tokens(role, d))
                continue
            if s.get("type") != "pattention":
                continue  # no type: updates the layers' blocks, whose counts are rewritten where they are set
            earlier = dict(list(config["layers"].items())[: j - 1])
            before = resolve_lm_config({**config, "layers": earlier})["per_layer"]
            path = f"model.layers.{sel}.{block}"
            prior = {before[i][block]["type"] for i in parse_layer_selector(sel, n_layers, path)}
            if prior == {"pattention"}:
                continue  # updates Pattentions: the count is inherited
            if "pattention" in prior:
                raise ConfigError(
                    f"grow: {path} makes some of its layers a Pattention and updates others that already are; "
                    f"give its {key} explicitly or split the layer selector"
                )
            s[key] = new_count(role, _default_tokens(role, d))
    return cfg


def freeze_old_tokens_(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, saved rows) for the tokens that existed before the latest growth; restore them after each
    optimizer step (``p[:n_old] = saved``) to train only the new tokens. Weight decay included."""
    out = []
    for m in model.modules():
        if isinstance(m, Pattention) and int(m.n_old) < m.n_tokens:
            for p in (m.key, m.value):
                out.append((p, p.detach()[: int(m.n_old)].clone()))
    return out
