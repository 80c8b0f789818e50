"""The Lightning callback of ``optim.freeze_old_tokens`` (imported only when a run uses it)."""

from __future__ import annotations

import lightning as L
import torch

from arch.growth import freeze_old_tokens_


class FreezeOldTokens(L.Callback):
    """After every optimizer step, write the pre-growth rows of every Pattention back (undoing their gradient
    update and weight decay), so only the tokens added by the latest ``grow`` train."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.saved = freeze_old_tokens_(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            for p, rows in self.saved:
                p[: rows.shape[0]].copy_(rows)
