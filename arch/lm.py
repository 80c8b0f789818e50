"""The causal language model: embeddings -> pre-norm blocks -> final norm -> head.

Every block is ``x + mixer(norm(x))`` then ``x + ffn(norm(x))``; which mixer, FFN and projection each layer
uses comes from the config (see ``arch.config``), so one model can mix block types layer by layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from .config import LAYER_KEYS, LayerContext, resolve_lm_config
from .registry import FFNS, MIXERS, MODELS, NORMS


class Block(nn.Module):
    """Pre-norm residual block: x <- x + mixer(norm1(x)); x <- x + ffn(norm2(x))."""

    def __init__(self, ctx: LayerContext, mixer: nn.Module, ffn: nn.Module):
        super().__init__()
        self.norm1, self.mixer = ctx.make_norm(ctx.d_model), mixer
        self.norm2, self.ffn = ctx.make_norm(ctx.d_model), ffn

    def forward(self, x: torch.Tensor, route: Optional[torch.Tensor] = None) -> torch.Tensor:  # [B, T, D]
        """``route`` ([B, T]) forces the route of every token through a routed FFN (``arch.duo``)."""
        return self.feed_forward(self.attend(x), route)

    def attend(self, x: torch.Tensor) -> torch.Tensor:  # the first half: x + mixer(norm1(x))
        return x + self.mixer(self.norm1(x))

    def feed_forward(self, x: torch.Tensor, route: Optional[torch.Tensor] = None) -> torch.Tensor:  # x + ffn(norm2(x))
        return x + (self.ffn(self.norm2(x)) if route is None else self.ffn(self.norm2(x), route=route))

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:  # [B, 1, D]: one new token, see CausalLM.step
        if not hasattr(self.mixer, "step"):
            raise NotImplementedError(f"{type(self.mixer).__name__} has no incremental decoding (mixer.step)")
        return self.feed_forward(x + self.mixer.step(self.norm1(x), cache))


@MODELS.register("lm")
class CausalLM(nn.Module):
    """``forward(input_ids [B, T]) -> logits [B, T, vocab]``; causal in every layer."""

    def __init__(self, cfg: Mapping):
        super().__init__()
        c = resolve_lm_config(cfg)
        self.config = {k: v for k, v in c.items() if k != "per_layer"}  # what export writes to config.yaml
        self.per_layer = c["per_layer"]
        self.shared = {}  # per-forward state the layers share (LayerContext.shared)
        self.tok_emb = nn.Embedding(c["vocab_size"], c["d_model"])
        nn.init.normal_(self.tok_emb.weight, std=c["init_std"])
        blocks = []
        for i, spec in enumerate(self.per_layer):
            ctx = LayerContext(
                d_model=c["d_model"],
                n_heads=c["n_heads"],
                n_kv_heads=c["n_kv_heads"],
                max_seq_len=c["max_seq_len"],
                n_layers=c["n_layers"],
                layer_idx=i,
                proj=spec["proj"],
                norm=c["norm"],
                rope_theta=c["rope_theta"],
                rope_fraction=c["rope_fraction"],
                init_std=c["init_std"],
                shared=self.shared,
            )
            blocks.append(Block(ctx, MIXERS.create(spec["mixer"], ctx), FFNS.create(spec["ffn"], ctx)))
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = NORMS.create(c["final_norm"], c["d_model"])
        self.head = nn.Linear(c["d_model"], c["vocab_size"], bias=False)
        if c["tie_embeddings"]:
            self.head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.head.weight, std=c["init_std"])

    @property
    def max_seq_len(self) -> int:
        return self.config["max_seq_len"]

    def forward(self, input_ids: torch.Tensor, routes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``routes`` (LongTensor [n_layers, B, T], optional) forces every token's route in every layer's routed
        FFN (``arch.duo``: SKIP=0, SMALL=1, BIG=2), e.g. for routing oracles."""
        T = input_ids.shape[1]  # input_ids: [B, T]
        if T > self.max_seq_len:
            raise ValueError(f"input has {T} tokens; this model's max_seq_len is {self.max_seq_len}")
        x = self.tok_emb(input_ids)  # [B, T, D]
        self.shared.clear()
        self.shared["forward"] = True  # layers may pass state down within this forward (and only this one)
        try:
            for i, block in enumerate(self.blocks):
                x = block(x) if routes is None else block(x, route=routes[i])
        finally:
            self.shared.clear()
        return self.head(self.norm_f(x))  # [B, T, vocab]

    def new_cache(self) -> list[dict]:
        """Empty per-layer decoding state for :meth:`step`."""
        return [{} for _ in self.blocks]

    def step(self, input_ids: torch.Tensor, cache: list[dict]) -> torch.Tensor:
        """Incremental decoding: input_ids [B, 1] is the next token; ``cache`` (from :meth:`new_cache`) holds
        every layer's keys, values and mixer state and is updated in place -> logits [B, 1, vocab], equal to the
        last row of ``forward`` on the whole sequence so far."""
        t = cache[0].get("t", 0)
        if t >= self.max_seq_len:
            raise ValueError(f"decoding position {t} exceeds this model's max_seq_len={self.max_seq_len}")
        x = self.tok_emb(input_ids)  # [B, 1, D]
        for block, layer_cache in zip(self.blocks, cache):
            x = block.step(x, layer_cache)
        return self.head(self.norm_f(x))  # [B, 1, vocab]

    def layer_table(self) -> list[dict]:
        """One row per layer: its mixer, FFN and projection specs (for ``python -m train info``)."""
        return [{"layer": i, **{k: spec[k] for k in LAYER_KEYS}} for i, spec in enumerate(self.per_layer)]
