"""The Lightning ``Trainer`` of ``fit``: loggers, the periodic checkpoint, and a replica-sync check."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from .checkpoint import AtomicCheckpointIO, PeriodicCheckpoint
from .distributed import build_strategy, is_sharded

# Lightning's advertising and a deprecation inside Lightning itself: noise in every run's output.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


class ReplicaSyncCheck(L.Callback):
    """With several processes, check at the end that every replica holds the same parameters."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2 or is_sharded(trainer):  # sharded: no process holds a whole replica
            return
        sums = torch.stack([p.detach().double().sum() for p in pl_module.parameters()])  # [n_params]
        gathered = trainer.strategy.all_gather(sums)  # [world, n_params]
        diff = (gathered - gathered[0]).abs().max().item()
        if diff != 0.0:
            raise RuntimeError(f"replicas diverged: max |param sum difference| = {diff}")
        rank_zero_info(f"replicas in sync across {trainer.world_size} processes (max param-sum difference 0)")


def build_trainer(cfg: dict, run_dir: Path, callbacks=(), loggers: bool = True) -> L.Trainer:
    tr = cfg["trainer"]
    logger = [TensorBoardLogger(run_dir, name="tb", version=""), CSVLogger(run_dir, name="csv", version="")]
    cbs = [
        PeriodicCheckpoint(run_dir / "checkpoints", tr["ckpt_every"], tr["keep_checkpoints"]),
        ReplicaSyncCheck(),
        *([LearningRateMonitor(logging_interval="step")] if loggers else []),
        *([TQDMProgressBar(refresh_rate=max(1, tr["log_every"] // 2))] if tr["progress_bar"] else []),
        *callbacks,
    ]
    return L.Trainer(
        max_steps=tr["max_steps"],
        max_epochs=-1,
        accelerator=tr["accelerator"],
        devices=tr["devices"],
        num_nodes=tr["num_nodes"],
        strategy=build_strategy(tr["strategy"]),
        precision=tr["precision"],
        accumulate_grad_batches=tr["accumulate_grad_batches"],
        val_check_interval=tr["val_every"] * tr["accumulate_grad_batches"],
        check_val_every_n_epoch=None,
        log_every_n_steps=tr["log_every"],
        logger=logger if loggers else False,
        callbacks=cbs,
        enable_checkpointing=True,
        enable_progress_bar=tr["progress_bar"],
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=run_dir,
    )
