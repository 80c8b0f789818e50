"""Training side of Duo-LLM (arXiv 2410.10846): route seeds, router temperature annealing, budget loss, stats.

The model (``arch.duo.DuoFFN``) knows nothing about steps. Before each training batch ``DuoHooks`` hands every
duo layer

* a route seed that is a pure function of (seed, rank, step, micro-batch, layer), so random routing (stage 1)
  gives the same loss curve for the same config, and a resumed run routes exactly as an uninterrupted one;
* the router inverse temperature β(step), annealed geometrically from ``optim.router_inv_temp[0]`` to ``[1]``
  over ``trainer.max_steps`` (stage 3: soft while β is small, close to the hard argmax used at inference).

After the forward pass it gives the budget loss ``α · (mean over layers of P_big − budget)²`` (paper, Sec. 3.3),
logged as ``train/router_aux``, and the routing statistics logged to TensorBoard: ``duo/layer{i}/{skip,small,big}``,
the fraction of tokens on each route per layer (mean router probabilities while soft).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from arch.duo import ROUTE_NAMES, DuoFFN
from arch.registry import ConfigError
from train.methods import METHODS, Hooks, Method


@dataclasses.dataclass
class DuoOptim:
    """``optim.*`` keys of Duo-LLM routers (``model.ffn: {type: duo, routing: router}``)."""

    router_budget: float = 0.5  # target mean P(big) over layers and tokens
    router_aux_weight: float = 1.0  # α in CE + α·(mean P_big − budget)²
    router_inv_temp: list[float] = dataclasses.field(default_factory=lambda: [1.0, 10.0])  # β from, to (geometric)
    freeze_backbone: bool = False  # train only the Duo routers (stage 3 on a frozen stage-1 model)


def duo_layers(model: nn.Module) -> list[DuoFFN]:
    return [m for m in model.modules() if isinstance(m, DuoFFN)]


def route_seed(*key: int) -> int:
    """A 63-bit seed that depends only on ``key``."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def inv_temp_at(step: int, optim: dict, max_steps: int) -> float:
    """β(step): geometric from ``router_inv_temp[0]`` at step 0 to ``router_inv_temp[1]`` at ``max_steps``."""
    b0, b1 = optim["router_inv_temp"]
    return b0 * (b1 / b0) ** min(step / max(max_steps, 1), 1.0)


def freeze_backbone(model: nn.Module) -> None:
    """Stage 3 with a frozen backbone: only the duo routers keep ``requires_grad``."""
    routers = {id(p) for m in duo_layers(model) for p in m.router.parameters()}
    if not routers:
        raise ConfigError("optim.freeze_backbone: the model has no duo FFN router to train")
    for p in model.parameters():
        p.requires_grad_(id(p) in routers)


class DuoHooks(Hooks):
    """Per-step control and readout of a model's duo layers."""

    def __init__(self, layers: list[DuoFFN], cfg: dict):
        self.layers = layers
        self.seed, self.optim, self.max_steps = cfg["seed"], cfg["optim"], cfg["trainer"]["max_steps"]

    def before_batch(self, step: int, micro: int = 0, rank: int = 0, split: int = 0) -> None:
        beta = inv_temp_at(step, self.optim, self.max_steps)
        for i, layer in enumerate(self.layers):
            layer.set_route_seed(route_seed(self.seed, rank, split, step, micro, i))
            layer.router_inv_temp = beta

    def before_validation(self, step: int, rank: int = 0) -> None:
        """Every validation pass routes the same way (the generator then runs on over its batches)."""
        self.before_batch(0, 0, rank, split=1)
        for layer in self.layers:
            layer.router_inv_temp = inv_temp_at(step, self.optim, self.max_steps)

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """α · (mean over router layers of P_big − budget)² of the last forward pass; none without soft routers."""
        p_big = [layer.p_big for layer in self.layers if layer.p_big is not None]
        if not p_big:
            return {}
        aux = self.optim["router_aux_weight"] * (torch.stack(p_big).mean() - self.optim["router_budget"]) ** 2
        return {"router_aux": aux}

    def metrics(self) -> dict[str, float]:
        """Fraction of tokens per route per layer in the last forward pass, and the router's β."""
        out = {}
        for i, layer in enumerate(self.layers):
            if layer.route_fraction is not None:
                out.update({f"duo/layer{i}/{name}": float(f) for name, f in zip(ROUTE_NAMES, layer.route_fraction)})
        if any(layer.routing == "router" for layer in self.layers):
            out["duo/router_inv_temp"] = self.layers[0].router_inv_temp
        return out


@METHODS.register("duo")
class Duo(Method):
    optim_fields = DuoOptim

    def validate(self, cfg: dict) -> None:
        beta = cfg["optim"]["router_inv_temp"]
        if len(beta) != 2 or min(beta) <= 0:
            raise ConfigError(f"optim.router_inv_temp: expected [from, to], both > 0, got {beta}")

    def attach(self, model: nn.Module, cfg: dict) -> DuoHooks | None:
        if cfg["optim"]["freeze_backbone"]:
            freeze_backbone(model)
        layers = duo_layers(model)
        return DuoHooks(layers, cfg) if layers else None

    def describe(self, model: nn.Module) -> list[str]:
        if not duo_layers(model):
            return []
        return ["(duo FFN layers counted with every token routed big: an upper bound)"]
