"""Duo FFN (Duo-LLM, Alizadeh et al. 2024, arXiv 2410.10846, Sec. 3): per layer a big and a small SwiGLU FFN;
each token goes to the big one, the small one, or skips the FFN (the residual stream passes unchanged).

Routes are coded ``SKIP=0, SMALL=1, BIG=2``. Routing modes (``routing:``):

* ``random``  — stage 1 of the paper: each token draws its route, BIG with ``p_big``, SKIP with ``p_skip``, else
  SMALL. The draws come from the module's own ``torch.Generator`` (``set_route_seed``), so ``train/`` makes them
  a pure function of (seed, step) and a resumed run routes exactly as an uninterrupted one.
* ``fixed``   — one route per layer for every token (``fixed_routes``, a list over all layers).
* ``router``  — stage 3: a linear map from the FFN input to route logits, ``softmax(β · logits)`` with an inverse
  temperature β that ``train/`` anneals upward; a soft mixture of the modules' outputs while training, the hard
  argmax route at inference. SKIP is a router choice only with ``router_skip: true``.
* forced     — ``forward(x, route=LongTensor[B, T])`` (the oracles) overrides the mode.

Hard routing computes only the chosen module for each token: ``kernels.routed_ffn.routed_ffn`` groups the tokens
by route (one stable sort) and runs each module once on its own tokens, so compute follows the route (``impl``:
``auto`` = grouped-GEMM Triton kernels on CUDA, sort/gather/compute/scatter in PyTorch on CPU;
``python -m train bench duo-ffn`` and ``python -m kernels.bench routed_ffn`` measure it).

Attributes written during ``forward`` (read by ``train/`` for the router loss and TensorBoard):

* ``route_fraction`` — FloatTensor [3], detached: the fraction of tokens on each route (SKIP, SMALL, BIG); while
  soft, the mean router probability of each route.
* ``p_big`` — the mean router probability of BIG over the tokens, with gradient (router mode while training;
  ``None`` otherwise): the paper's budget loss is ``α · (mean over layers of p_big − budget)²``.

Attribute set by the caller: ``router_inv_temp`` (β, float; default 1).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

from kernels.routed_ffn import SwiGLUWeights, routed_ffn
from kernels.routed_ffn.api import Impl
from kernels.routed_ffn.naive import BIG, SKIP, SMALL

from .config import LayerContext
from .mlp import MLP, default_d_ff
from .registry import FFNS, ConfigError

ROUTE_NAMES = ("skip", "small", "big")


@FFNS.register("duo")
class DuoFFN(nn.Module):
    """big: SwiGLU MLP with ``d_ff``; small: SwiGLU MLP with ``d_ff // small_ratio`` (the paper: 10240 / 640).

    ``big`` (optional): an existing FFN ([.., D] -> [.., D], hidden width ``d_ff``) to use as the big module, e.g. a
    pretrained model's MLP (``arch.interop.swap_mlp``); the small module is always new.
    """

    def __init__(
        self,
        ctx: LayerContext,
        big: Optional[nn.Module] = None,
        *,
        d_ff: Optional[int] = None,
        small_ratio: int = 16,
        routing: Literal["random", "fixed", "router"] = "random",
        p_big: float = 0.5,
        p_skip: float = 0.0,
        fixed_routes: Optional[list[Literal["skip", "small", "big"]]] = None,
        router_skip: bool = False,
        impl: Impl = "auto",
    ):
        super().__init__()
        self.impl = impl  # kernels.routed_ffn implementation of hard routing
        where = f"model.ffn (duo, layer {ctx.layer_idx})"
        d_ff = d_ff or default_d_ff(ctx.d_model, "swiglu")
        if small_ratio < 1 or d_ff % small_ratio:
            raise ConfigError(f"{where}.small_ratio: {small_ratio} must be >= 1 and divide d_ff={d_ff}")
        if not (0.0 <= p_big and 0.0 <= p_skip and p_big + p_skip <= 1.0):
            raise ConfigError(
                f"{where}.p_big, p_skip: need p_big >= 0, p_skip >= 0, p_big + p_skip <= 1; got {p_big}, {p_skip}"
            )
        if routing == "fixed" and (fixed_routes is None or len(fixed_routes) != ctx.n_layers):
            raise ConfigError(
                f"{where}.fixed_routes: routing 'fixed' needs one route per layer "
                f"({ctx.n_layers} of skip | small | big), got {fixed_routes!r}"
            )
        if routing != "fixed" and fixed_routes is not None:
            raise ConfigError(f"{where}.fixed_routes: only used with routing 'fixed' (routing is {routing!r})")
        self.routing, self.p_big_random, self.p_skip_random, self.router_skip = routing, p_big, p_skip, router_skip
        self.fixed_route = ROUTE_NAMES.index(fixed_routes[ctx.layer_idx]) if routing == "fixed" else None
        self.big = MLP(ctx, d_ff=d_ff) if big is None else big  # [B, T, D] -> [B, T, D]
        self.small = MLP(ctx, d_ff=d_ff // small_ratio)
        # Every duo layer has a router (trained and used only by routing 'router'), so checkpoints of all modes
        # share weights: a stage-1 (random) checkpoint initialises a stage-3 (router) model exactly.
        # Zero init: uniform routes.
        self.router = nn.Linear(ctx.d_model, len(ROUTE_NAMES))
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        self.router.requires_grad_(routing == "router")  # unused otherwise: no gradient expected (DDP)
        self.router_inv_temp = 1.0
        self.generator = torch.Generator().manual_seed(ctx.layer_idx)
        self.route_fraction: Optional[torch.Tensor] = None
        self.p_big: Optional[torch.Tensor] = None

    def set_route_seed(self, seed: int) -> None:
        """Reseed the generator that random routing draws from."""
        self.generator.manual_seed(seed)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, 3]
        logits = self.router(x)
        if not self.router_skip:
            logits = logits.index_fill(-1, torch.tensor([SKIP], device=x.device), float("-inf"))
        return logits

    @torch.no_grad()
    def choose_route(self, x: torch.Tensor) -> torch.Tensor:
        """The hard route of every token under this layer's routing mode: LongTensor [B, T]."""
        B, T, _ = x.shape
        if self.routing == "random":
            u = torch.rand(B, T, generator=self.generator).to(x.device)  # [B, T]
            big = torch.where(u < self.p_skip_random + self.p_big_random, BIG, SMALL)
            return torch.where(u < self.p_skip_random, SKIP, big)
        if self.routing == "fixed":
            return torch.full((B, T), self.fixed_route, dtype=torch.long, device=x.device)
        return self.router_logits(x).argmax(-1)  # inference: hard argmax

    def forward(self, x: torch.Tensor, route: Optional[torch.Tensor] = None) -> torch.Tensor:  # [B, T, D]
        self.p_big = None
        if route is None and self.routing == "router" and self.training:
            return self.soft(x)
        return self.hard(x, self.choose_route(x) if route is None else route)

    def soft(self, x: torch.Tensor) -> torch.Tensor:
        """Soft mixture (router training): p_small · small(x) + p_big · big(x); SKIP contributes zero."""
        p = torch.softmax(self.router_inv_temp * self.router_logits(x).float(), dim=-1).to(x.dtype)  # [B, T, 3]
        self.p_big = p[..., BIG].mean()
        self.route_fraction = p.detach().flatten(0, 1).mean(0)  # [3]
        return p[..., SMALL, None] * self.small(x) + p[..., BIG, None] * self.big(x)

    def hard(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """Each token through its own route only (x [B, T, D], route [B, T] in {SKIP, SMALL, BIG})."""
        if x.is_meta:  # shape-only pass (FLOP counting on the meta device): the all-big upper bound
            return self.big(x)
        counts = torch.bincount(route.flatten(), minlength=len(ROUTE_NAMES))  # [3]
        self.route_fraction = counts.float() / route.numel()
        weights = [swiglu_weights(m) for m in (self.small, self.big)]  # None for a foreign module (e.g. a HF MLP)
        modules = weights if all(w is not None for w in weights) else [self.small, self.big]
        return routed_ffn(x, route, *modules, impl=self.impl)  # [B, T, D]


def swiglu_weights(m: nn.Module) -> SwiGLUWeights | None:
    """The SwiGLU weights of one of our bias-free SwiGLU MLPs (what the Triton kernels take); None for any other
    module, which then runs as itself on its tokens."""
    linears = [getattr(m, name, None) for name in ("w1", "w3", "w2")]
    if all(isinstance(lin, nn.Linear) and lin.bias is None for lin in linears):
        return SwiGLUWeights(m.w1.weight, m.w3.weight, m.w2.weight)
    return None
