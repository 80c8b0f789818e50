"""Model config schema: the ``model:`` mapping of a config file, checked before anything is built.

The LM's own keys are the fields of :class:`LMConfig`. ``mixer``, ``ffn``, ``proj`` and ``norm`` are block
specs (a registered name, or a mapping ``{type: name, **options}``) checked against the registered class's
keyword-only ``__init__`` parameters. ``layers`` overrides blocks for some layers::

    layers:
      "0-3":  {mixer: {type: dense}}
      "4-11": {mixer: {type: dhsa, budget: 512}}

Layer selectors: ``"5"``, ``"0-3"`` (inclusive), ``"0-11:2"`` (every second layer), ``"*"`` (all), and comma
lists of these (``"0,2,7-9"``). Overrides apply in the order written. An override whose ``type`` equals the
base block's type updates its options; a different ``type`` replaces the block (options of the old type do
not carry over).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, Optional

from .registry import FFNS, MIXERS, NORMS, PROJS, ConfigError, check_fields, fields_of_dataclass

LAYER_KEYS = {"mixer": MIXERS, "ffn": FFNS, "proj": PROJS}


@dataclasses.dataclass
class LMConfig:
    """Keys of a causal LM config (``kind: lm``)."""

    d_model: int
    n_layers: int
    n_heads: int
    max_seq_len: int
    kind: Literal["lm"] = "lm"
    vocab_size: int = 256
    n_kv_heads: Optional[int] = None  # grouped-query attention: None = n_heads
    mixer: Any = "dense"
    ffn: Any = "mlp"
    proj: Any = "linear"
    norm: Any = "rmsnorm"  # the blocks' norms
    final_norm: Any = None  # the norm before the head; None = same as `norm` (TokenFormer: layernorm)
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # fraction of each head's dims that RoPE rotates (TokenFormer: 0.25)
    init_std: float = 0.02
    layers: dict = dataclasses.field(default_factory=dict)


def parse_layer_selector(key: str, n_layers: int, path: str) -> list[int]:
    """``"0-3,8"`` -> [0, 1, 2, 3, 8]; error naming ``path`` if malformed or out of range."""
    out: list[int] = []
    for part in str(key).split(","):
        part = part.strip()
        try:
            if part == "*":
                idx = list(range(n_layers))
            else:
                rng, _, step = part.partition(":")
                lo, dash, hi = rng.partition("-")
                lo_i = int(lo)
                hi_i = int(hi) if dash else lo_i
                idx = list(range(lo_i, hi_i + 1, int(step) if step else 1))
        except ValueError:
            raise ConfigError(
                f"{path}: bad layer selector {part!r}; use an index '5', a range '0-3', a stepped range "
                "'0-11:2', '*' for all layers, or a comma list of these"
            ) from None
        bad = [i for i in idx if not 0 <= i < n_layers] or ([] if idx else [part])
        if bad:
            raise ConfigError(f"{path}: layer {bad[0]} is out of range; allowed layers: 0-{n_layers - 1}")
        out += idx
    return out


def merge(base: Any, child: Any) -> Any:
    """The one merge rule of configs (base file <- child file <- overrides, and a layer's block <- its per-layer
    override): recursive over mappings, except that a mapping whose ``type`` differs from the base's replaces
    it whole, so the old type's options do not leak into the new block."""
    if not (isinstance(base, Mapping) and isinstance(child, Mapping)):
        return child
    if "type" in child and "type" in base and child["type"] != base["type"]:
        return dict(child)
    return {**base, **{k: merge(base[k], v) if k in base else v for k, v in child.items()}}


def resolve_lm_config(cfg: Mapping, path: str = "model") -> dict:
    """Check an LM config and return it resolved: every default filled in, plus ``per_layer``, the list of
    fully resolved ``{mixer, ffn, proj}`` specs of every layer."""
    c = check_fields(cfg, fields_of_dataclass(LMConfig), path)
    for key in ("d_model", "n_layers", "n_heads", "max_seq_len", "vocab_size"):
        if c[key] < 1:
            raise ConfigError(f"{path}.{key}: must be >= 1, got {c[key]}")
    if c["d_model"] % c["n_heads"]:
        raise ConfigError(
            f"{path}.d_model: {c['d_model']} is not divisible by {path}.n_heads={c['n_heads']}; "
            f"allowed n_heads: divisors of {c['d_model']}"
        )
    kv = c["n_kv_heads"] if c["n_kv_heads"] is not None else c["n_heads"]
    if kv < 1 or c["n_heads"] % kv:
        raise ConfigError(
            f"{path}.n_kv_heads: {kv} must divide {path}.n_heads={c['n_heads']} (grouped-query attention)"
        )
    c["n_kv_heads"] = kv
    rot = c["d_model"] // c["n_heads"] * c["rope_fraction"]
    if not 0.0 <= c["rope_fraction"] <= 1.0 or not rot.is_integer() or int(rot) % 2:
        raise ConfigError(
            f"{path}.rope_fraction: {c['rope_fraction']} must be in [0, 1] and rotate an even number of the "
            f"{c['d_model'] // c['n_heads']} head dims"
        )
    c["norm"] = NORMS.build_spec(c["norm"], f"{path}.norm")
    c["final_norm"] = NORMS.build_spec(c["final_norm"] or c["norm"], f"{path}.final_norm")
    for key, reg in LAYER_KEYS.items():
        c[key] = reg.build_spec(c[key], f"{path}.{key}")

    per_layer = [{key: dict(c[key]) for key in LAYER_KEYS} for _ in range(c["n_layers"])]
    layers = {}
    for sel, override in c["layers"].items():
        opath = f"{path}.layers.{sel}"
        if not isinstance(override, Mapping):
            raise ConfigError(f"{opath}: expected a mapping with keys among {', '.join(LAYER_KEYS)}")
        unknown = [k for k in override if k not in LAYER_KEYS]
        if unknown:
            raise ConfigError(f"{opath}.{unknown[0]}: unknown key; allowed keys: {', '.join(LAYER_KEYS)}")
        # an override may omit `type`: it then updates the options of the layer's current block
        for k, v in override.items():
            if not isinstance(v, (str, Mapping)):
                raise ConfigError(f"{opath}.{k}: expected a block name or a mapping of options, got {v!r}")
        layers[str(sel)] = {k: {"type": v} if isinstance(v, str) else dict(v) for k, v in override.items()}
        for i in parse_layer_selector(sel, c["n_layers"], opath):
            for key, spec in layers[str(sel)].items():
                merged = merge(per_layer[i][key], spec)
                per_layer[i][key] = LAYER_KEYS[key].build_spec(merged, f"{opath}.{key}")
    c["layers"] = layers
    c["per_layer"] = per_layer
    return c


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """Model-wide facts a block needs to build itself (dims, depth, how to make projections)."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    max_seq_len: int
    n_layers: int
    layer_idx: int
    proj: dict
    norm: dict
    rope_theta: float
    rope_fraction: float
    init_std: float
    # one dict per model, shared by all its layers: state that blocks pass down the layers within one forward
    # (e.g. DHSA's ``share_boundaries``); the model clears it before and after every forward
    shared: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def for_block(
        cls,
        *,
        d_model: int,
        n_heads: int,
        n_kv_heads: Optional[int] = None,
        max_seq_len: int = 2048,
        n_layers: int = 1,
        layer_idx: int = 0,
        proj: Any = "linear",
        norm: Any = "rmsnorm",
        rope_theta: float = 10000.0,
        rope_fraction: float = 1.0,
        init_std: float = 0.02,
    ) -> LayerContext:
        """The context of one block built outside our ``CausalLM`` (from plain numbers), checked like a model
        config: e.g. ``DHSA(LayerContext.for_block(d_model=512, n_heads=8), budget=256)``. ``n_layers`` and
        ``layer_idx`` only matter for inits scaled by depth and per-layer options (Duo ``fixed_routes``)."""
        c = resolve_lm_config(
            {
                "d_model": d_model,
                "n_heads": n_heads,
                "n_kv_heads": n_kv_heads,
                "max_seq_len": max_seq_len,
                "n_layers": n_layers,
                "proj": proj,
                "norm": norm,
                "rope_theta": rope_theta,
                "rope_fraction": rope_fraction,
                "init_std": init_std,
            },
            path="block",
        )
        if not 0 <= layer_idx < n_layers:
            raise ConfigError(f"block.layer_idx: {layer_idx} is out of range; allowed: 0-{n_layers - 1}")
        keep = ("d_model", "n_heads", "n_kv_heads", "max_seq_len", "n_layers", "proj", "norm", "rope_theta")
        return cls(
            **{k: c[k] for k in keep}, layer_idx=layer_idx, rope_fraction=c["rope_fraction"], init_std=c["init_std"]
        )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def make_proj(self, d_in: int, d_out: int, role: Literal["qkv", "proj", "ffn_in", "ffn_out"]):
        """A projection of the configured kind (``proj:``); ``role`` picks its init and slot count."""
        return PROJS.create(self.proj, self, d_in, d_out, role)

    def make_norm(self, dim: int):
        return NORMS.create(self.norm, dim)

    def residual_std(self) -> float:
        """Init std of projections that write into the residual stream (GPT-2: scaled by 1/sqrt(2L))."""
        return self.init_std / (2 * self.n_layers) ** 0.5


def to_plain(cfg: Any) -> Any:
    """DictConfig/ListConfig (or nested plain containers) -> plain dicts and lists, interpolations resolved."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        pass
    if isinstance(cfg, Mapping):
        return {k: to_plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_plain(v) for v in cfg]
    return cfg
