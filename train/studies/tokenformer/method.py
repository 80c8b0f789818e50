"""Training side of TokenFormer's progressive scaling: ``optim.freeze_old_tokens`` keeps the parameter tokens
that existed before the latest ``grow`` frozen, so that only the new tokens train."""

from __future__ import annotations

import dataclasses

from torch import nn

from train.methods import METHODS, Hooks, Method


@dataclasses.dataclass
class TokenFormerOptim:
    # after `grow` + `fit --init-from`: train only the new parameter tokens (TokenFormer's reference trains all)
    freeze_old_tokens: bool = False


class FrozenTokenHooks(Hooks):
    def callbacks(self) -> list:
        from .callbacks import FreezeOldTokens

        return [FreezeOldTokens()]


@METHODS.register("tokenformer")
class TokenFormer(Method):
    optim_fields = TokenFormerOptim

    def attach(self, model: nn.Module, cfg: dict) -> Hooks | None:
        return FrozenTokenHooks() if cfg["optim"]["freeze_old_tokens"] else None
