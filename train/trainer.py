"""The Lightning ``Trainer`` of ``fit``: loggers, the periodic checkpoint, and a replica-sync check."""

from __future__ import annotations

import logging
import time
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


class ValidationLine(L.Callback):
    """One console line per validation during ``fit``: step, val loss, bits/byte (LMs) or top-1 (classifiers),
    throughput since the start, elapsed time and the time left at that pace."""

    def __init__(self, items_per_step: int, unit: str):
        self.items_per_step, self.unit = items_per_step, unit  # per process
        self.t0, self.step0 = time.perf_counter(), 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0, self.step0 = time.perf_counter(), trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking or not trainer.is_global_zero:
            return
        line = validation_line(
            trainer.callback_metrics,
            trainer.global_step,
            trainer.max_steps,
            trainer.global_step - self.step0,
            self.items_per_step * trainer.world_size,
            self.unit,
            time.perf_counter() - self.t0,
        )
        if trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.print(line)
        else:
            print(line, flush=True)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def validation_line(metrics, step: int, max_steps: int, done: int, items: int, unit: str, elapsed: float) -> str:
    """``step 300/1200: val loss 1.8234, 2.6310 bits/byte | 5,123 tokens/s | elapsed 2:31 | ETA 7:33``."""
    line = f"step {step}/{max_steps}: val loss {float(metrics['val/loss']):.4f}"
    if "val/bpb" in metrics:
        line += f", {float(metrics['val/bpb']):.4f} bits/byte"
    if "val/acc1" in metrics:
        line += f", top-1 {100 * float(metrics['val/acc1']):.2f}%"
    if done > 0 and elapsed > 0:
        line += f" | {done * items / elapsed:,.0f} {unit}/s | elapsed {_clock(elapsed)}"
        line += f" | ETA {_clock(elapsed / done * (max_steps - step))}"
    return line


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


def build_trainer(cfg: dict, run_dir: Path, callbacks=(), loggers: bool = True, segment: str = "") -> L.Trainer:
    """The Trainer of a run in ``run_dir``. ``segment``: the CSV log's sub-folder of a resumed run (its earlier
    metrics stay in ``csv/metrics.csv`` and the other segments' folders)."""
    from .config import task_of

    tr, d = cfg["trainer"], cfg["data"]
    logger = [TensorBoardLogger(run_dir, name="tb", version=""), CSVLogger(run_dir, name="csv", version=segment)]
    if task_of(cfg) == "lm":
        line = ValidationLine(d["batch_size"] * d["seq_len"] * tr["accumulate_grad_batches"], "tokens")
    else:
        line = ValidationLine(d["batch_size"] * tr["accumulate_grad_batches"], "images")
    cbs = [
        PeriodicCheckpoint(run_dir / "checkpoints", tr["ckpt_every"], tr["keep_checkpoints"]),
        ReplicaSyncCheck(),
        line,
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
