"""Swap our attention mixers and FFNs into a Hugging Face causal LM in place, keeping its pretrained weights.

* ``swap_attention(model, mixer, layers="*")``: each chosen decoder layer's self-attention becomes a
  ``SwappedAttention`` that keeps the layer's own q/k/v/o modules (the same modules, the same weights), applies the
  model's RoPE from the ``position_embeddings`` (cos, sin) the model passes in (so every rope-scaling variant its
  config declares is honoured), keeps its grouped-query layout, its attention scaling and its KV cache
  (``Cache.update``), and computes the attention with our mixer's selection and the block-sparse core
  (``mixer.attend``, ``mixer.attend_step``: the mixers' own code).
* ``swap_mlp(model, ffn, layers="*")``: each chosen layer's MLP becomes a ``DuoFFN`` whose big module IS the
  pretrained MLP and whose small module is new (``d_ff / small_ratio``).
* ``restore(model)``: the original modules back, bit-exact.

Supported: Llama (SmolLM2), Mistral, Qwen2 (q/k/v biases are part of the kept projections), Granite
(``attention_multiplier``), and Gemma2 without attention soft-capping; anything else raises
``ValueError("not supported: <class> ...")``. Nothing here imports ``transformers``: the model's own modules do
the work, so ``arch.interop`` imports without it.

Decoding (a query of length 1 over a non-empty cache): DHSA in ``causal`` mode decodes sparsely with its own
``attend_step`` (the state a one-by-one decode would hold is computed from the prefill: ``DHSA.decode_state``),
one sequence at a time (batch size 1, no beam search);
DHSA in ``prefill`` mode (the authors' code), causal BRA (no incremental routing yet) and dense decode densely
over the cached keys. A query of several tokens over a non-empty cache (chunked prefill, assisted decoding) raises.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import nn

from ..attention import CausalSelfAttention, attend_keys
from ..config import LayerContext, parse_layer_selector, to_plain
from ..dhsa import DHSA
from ..registry import FFNS, MIXERS, ConfigError

# model_type -> the attention class its decoder layers must hold (the layout SwappedAttention relies on)
ATTENTION_CLASSES = {
    "llama": "LlamaAttention",
    "mistral": "MistralAttention",
    "qwen2": "Qwen2Attention",
    "granite": "GraniteAttention",
    "gemma2": "Gemma2Attention",
}
SUPPORTED = "Llama (SmolLM2), Mistral, Qwen2, Granite, Gemma2 without attention soft-capping"
STATE = "_adaptive_compute_decode"  # attribute of a transformers Cache holding the DHSA decoding state per layer
BATCHED = "batched"  # the state of a layer whose prefill had several sequences
Layers = Union[str, int, list]


class SwappedAttention(nn.Module):
    """A pretrained attention layer whose token-token attention is our mixer (see the module docstring).

    q_proj, k_proj, v_proj, o_proj are the original layer's modules; ``mixer`` is ours without projections
    (``CausalSelfAttention.core_only``); ``original`` (not a submodule) is the replaced layer, for ``restore``.
    """

    def __init__(self, attn: nn.Module, mixer: CausalSelfAttention, n_heads: int, n_kv_heads: int, window):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.mixer = mixer
        self.layer_idx, self.head_dim, self.window = attn.layer_idx, attn.head_dim, window
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        # our mixers scale logits by head_dim**-0.5: fold the model's own scaling into q (1.0 for Llama-style)
        self.q_factor = attn.scaling / attn.head_dim**-0.5
        self.sparse_decode = isinstance(mixer, DHSA) and mixer.mode == "causal"
        self.rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model's own RoPE function
        object.__setattr__(self, "original", attn)  # kept outside the module tree: no duplicate state_dict keys

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Any = None,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """hidden_states [B, T, D] -> ([B, T, D], None), the signature of the attention it replaces."""
        cache = cache if cache is not None else past_key_values
        B, T, _ = hidden_states.shape
        q, k, v = self.project(hidden_states, position_embeddings)  # [B, h, T, hd]
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        if self.window is not None and past + T > self.window:
            raise ValueError(
                f"layer {self.layer_idx}: {past + T} positions exceed this layer's sliding window of {self.window} "
                f"tokens, which the swapped attention does not apply; use sequences of at most {self.window} tokens"
            )
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, Hkv, past + T, hd]
            if k.shape[2] != past + T:
                raise ValueError(
                    f"layer {self.layer_idx}: the cache returned {k.shape[2]} keys for {past + T} positions; "
                    "the swapped attention needs the default DynamicCache (no static or sliding-window cache)"
                )
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, T(+past), h, hd]: our mixers' layout
        if self.q_factor != 1.0:
            q = q * self.q_factor
        y = self.prefill(q, k, v, cache) if past == 0 else self.decode(q, k, v, cache)  # [B, T, H, hd]
        return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim)), None

    def project(self, hidden_states: torch.Tensor, position_embeddings: tuple) -> tuple[torch.Tensor, ...]:
        """hidden_states [B, T, D] -> q [B, H, T, hd], k, v [B, Hkv, T, hd]: the pretrained projections, q and k
        rotated with the model's cos, sin (the layout of the attention this replaces)."""
        B, T, _ = hidden_states.shape
        heads = lambda x: x.view(B, T, -1, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k = heads(self.q_proj(hidden_states)), heads(self.k_proj(hidden_states))
        q, k = self.rotate(q, k, *position_embeddings)
        return q, k, heads(self.v_proj(hidden_states))

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: Any) -> torch.Tensor:
        """The whole sequence at once: the mixer's selection and attention; with a cache and a sparse decoder,
        the decoding state is stored on the cache (it lives and dies with it)."""
        if cache is not None and self.sparse_decode:  # one sequence at a time: a batch (or beams) has no state
            state = self.mixer.decode_state(q, k) if q.shape[0] == 1 else BATCHED
            cache.__dict__.setdefault(STATE, {})[self.layer_idx] = state
        return self.mixer.attend(q, k, v)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: Any) -> torch.Tensor:
        """One new query over the cached keys and values: DHSA's sparse ``attend_step``, else dense."""
        if q.shape[1] != 1:
            raise NotImplementedError(
                f"layer {self.layer_idx}: {q.shape[1]} new tokens over a non-empty cache (chunked prefill or assisted "
                "decoding) is not supported by the swapped attention; run the prompt in one call, then decode one "
                "token at a time"
            )
        if not self.sparse_decode:
            return attend_keys(q, k, v)
        state = getattr(cache, STATE, {}).get(self.layer_idx)
        if state is None:
            raise RuntimeError(
                f"layer {self.layer_idx}: DHSA decoding needs the prompt to have run through the swapped layer with "
                "this cache; start from an empty cache"
            )
        if state is BATCHED:
            raise NotImplementedError(
                "DHSA decodes sparsely one sequence at a time (batch size 1, no beam search): generate for one "
                "sequence per call, or pass use_cache=False"
            )
        state["k"], state["v"] = k, v
        return self.mixer.attend_step(q, state)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, q_factor={self.q_factor:g}, sparse_decode={self.sparse_decode}"


# ---------------------------------------------------------------------------------------------------- helpers
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported model (``ForCausalLM`` or bare ``Model``); ValueError otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(model).__name__
    if model_type not in ATTENTION_CLASSES:
        raise ValueError(f"not supported: {name} (model_type {model_type!r}); supported: {SUPPORTED}")
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    want = ATTENTION_CLASSES[model_type]
    if not isinstance(layers, nn.ModuleList) or not all(
        type(_original_attention(layer)).__name__ == want for layer in layers
    ):
        raise ValueError(f"not supported: {name}: its decoder layers do not hold {want} modules")
    return layers


def _original_attention(layer: nn.Module) -> nn.Module:
    attn = layer.self_attn
    return attn.original if isinstance(attn, SwappedAttention) else attn


def _record(model: nn.Module) -> dict:
    """What was swapped: {"attn": {layer: original}, "mlp": {layer: original}, "hook": handle or None}."""
    return model.__dict__.setdefault("_adaptive_compute_swaps", {"attn": {}, "mlp": {}, "hook": None})


def select_layers(layers: Layers, n_layers: int) -> list[int]:
    """``"*"``, ``"0-3,8"``, an index or a list of indices -> sorted unique layer indices."""
    if isinstance(layers, int):
        layers = str(layers)
    if isinstance(layers, (list, tuple)):
        layers = ",".join(str(i) for i in layers)
    return sorted(set(parse_layer_selector(layers, n_layers, "layers")))


def _reject_padding(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the swapped attention is causal over the whole sequence; padded batches would attend
    to padding, so they fail instead of giving wrong results silently."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is not None and (mask.dim() != 2 or not bool(mask.all())):
        raise ValueError(
            "the swapped attention takes unpadded batches only (attention_mask all ones); run sequences of "
            "different lengths one at a time"
        )


def _mixer_for(spec: Any, config: Any, layer_idx: int) -> CausalSelfAttention:
    """Our mixer (``core_only``) for one layer of the model, from a mixer spec as in configs."""
    spec = MIXERS.build_spec(to_plain(spec), "mixer")
    cls = MIXERS.get(spec["type"], "mixer.type")
    if not issubclass(cls, CausalSelfAttention):
        raise ValueError(f"not supported: mixer {spec['type']!r} (swap_attention takes attention mixers)")
    if spec.get("chunker") == "learned" and spec.get("predictor") is None:
        raise ConfigError(
            "mixer.predictor: chunker 'learned' on a pretrained model needs trained boundary predictors (a file "
            "for this model's keys); use chunker 'similarity' or 'fixed'"
        )
    forced = spec.get("n_init", 0) + spec.get("n_recent", 0)
    if spec["type"] == "dhsa" and spec["budget"] < forced:
        raise ConfigError(
            f"mixer.budget: {spec['budget']} is smaller than the keys every query block is given anyway "
            f"(n_init + n_recent = {forced}); use budget >= {forced} or lower n_init / n_recent"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ctx = LayerContext.for_block(
        d_model=config.num_attention_heads * head_dim,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        max_seq_len=config.max_position_embeddings,
        n_layers=config.num_hidden_layers,
        layer_idx=layer_idx,
    )
    return cls.core_only(ctx, **{k: v for k, v in spec.items() if k != "type"})


# ---------------------------------------------------------------------------------------------------- public
def swap_attention(model: nn.Module, mixer: Union[str, Mapping], layers: Layers = "*") -> nn.Module:
    """Replace the self-attention of the chosen decoder layers of a Hugging Face causal LM with ``mixer`` (a
    mixer spec as in configs: ``{"type": "dhsa", "budget": 512}``, ``{"type": "bra", "topk": 8}``,
    ``{"type": "dhsa", "chunker": "fixed"}``, ``"dense"``), in place, keeping the pretrained weights; returns the
    model. Swapping a swapped layer again replaces its mixer. ``restore(model)`` undoes it."""
    all_layers = decoder_layers(model)
    config = model.config
    if getattr(config, "model_type", None) == "gemma2" and getattr(config, "attn_logit_softcapping", None):
        raise ValueError(
            f"not supported: {type(model).__name__} with attention soft-capping (attn_logit_softcapping="
            f"{config.attn_logit_softcapping}): the block-sparse core computes plain softmax attention"
        )
    chosen = select_layers(layers, len(all_layers))
    mixers = {i: _mixer_for(mixer, config, i) for i in chosen}  # every spec error before anything changes
    record = _record(model)
    for i, m in mixers.items():
        attn = _original_attention(all_layers[i])
        window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
        n_kv = config.num_key_value_heads or config.num_attention_heads
        swapped = SwappedAttention(attn, m, config.num_attention_heads, n_kv, window)
        all_layers[i].self_attn = swapped.train(all_layers[i].self_attn.training)  # the mode of the one it replaces
        record["attn"].setdefault(i, attn)
    if record["hook"] is None:
        record["hook"] = model.register_forward_pre_hook(_reject_padding, with_kwargs=True)
    return model


def swap_mlp(model: nn.Module, ffn: Union[str, Mapping], layers: Layers = "*") -> nn.Module:
    """Replace the MLP of the chosen decoder layers with a ``DuoFFN`` (``ffn``: a spec ``{"type": "duo", ...}``)
    whose big module is the pretrained MLP itself and whose small module is a new SwiGLU MLP of width
    ``intermediate_size / small_ratio``; in place, returns the model. All-big routing (``routing: fixed`` with
    every route ``big``, or ``p_big: 1``) computes exactly the original MLP."""
    all_layers = decoder_layers(model)
    config = model.config
    spec = FFNS.build_spec(to_plain(ffn), "ffn")
    if spec["type"] != "duo":
        raise ValueError(f"not supported: ffn {spec['type']!r}; swap_mlp builds a DuoFFN around the pretrained MLP")
    d_ff = config.intermediate_size
    if spec["d_ff"] not in (None, d_ff):
        raise ConfigError(f"ffn.d_ff: {spec['d_ff']} differs from the pretrained MLP's width {d_ff}; leave it unset")
    spec["d_ff"] = d_ff
    record = _record(model)
    duos = {}
    for i in select_layers(layers, len(all_layers)):
        ctx = LayerContext.for_block(
            d_model=config.hidden_size,
            n_heads=1,  # an FFN has no heads
            max_seq_len=config.max_position_embeddings,
            n_layers=config.num_hidden_layers,
            layer_idx=i,
            init_std=getattr(config, "initializer_range", 0.02),
        )
        big = record["mlp"].get(i, all_layers[i].mlp)
        duo = FFNS.create(spec, ctx, big=big).to(device=_device_of(big), dtype=_dtype_of(big))
        duos[i] = duo.train(all_layers[i].mlp.training)  # the mode of the module it replaces
    for i, duo in duos.items():
        record["mlp"].setdefault(i, all_layers[i].mlp)
        all_layers[i].mlp = duo
    return model


def restore(model: nn.Module) -> nn.Module:
    """Put back every original attention and MLP module that ``swap_attention`` / ``swap_mlp`` replaced; the
    model is then the original one (the same modules, the same weights). Returns the model."""
    record = model.__dict__.pop("_adaptive_compute_swaps", None)
    if record is None:
        return model
    all_layers = decoder_layers(model)
    for i, attn in record["attn"].items():
        all_layers[i].self_attn = attn
    for i, mlp in record["mlp"].items():
        all_layers[i].mlp = mlp
    if record["hook"] is not None:
        record["hook"].remove()
    return model


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
