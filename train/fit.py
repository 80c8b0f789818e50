"""``python -m train fit``: pretrain a model from a config with Lightning."""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import OmegaConf

from arch import ConfigError
from arch.io import atomic_write, save_pretrained

from .checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    PeriodicCheckpoint,
    latest_checkpoint,
    load_trained,
    read_checkpoint,
)
from .config import load_config, task_of
from .data import LMDataModule, bits_per_byte
from .grow import FreezeOldTokens
from .module import ClassifierModule, LMModule

RUN_DIR_ENV = "ADAPTIVE_COMPUTE_RUN_DIR"  # shared with the processes that `strategy=ddp` launches

# Lightning's advertising and a deprecation inside Lightning itself: noise in every run's output.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


class ReplicaSyncCheck(L.Callback):
    """With several processes, check at the end that every replica holds the same parameters."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2:
            return
        sums = torch.stack([p.detach().double().sum() for p in pl_module.parameters()])  # [n_params]
        gathered = trainer.strategy.all_gather(sums)  # [world, n_params]
        diff = (gathered - gathered[0]).abs().max().item()
        if diff != 0.0:
            raise RuntimeError(f"replicas diverged: max |param sum difference| = {diff}")
        rank_zero_info(f"replicas in sync across {trainer.world_size} processes (max param-sum difference 0)")


def make_run_dir(cfg: dict) -> Path:
    """``<out_dir>/<name>/<timestamp>``, unique; processes launched by ``strategy=ddp`` inherit it via env."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    base = Path(cfg["trainer"]["out_dir"]) / cfg["name"] / time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = base, 0
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


def build_trainer(cfg: dict, run_dir: Path, callbacks=(), loggers: bool = True) -> L.Trainer:
    tr = cfg["trainer"]
    logger = (
        [TensorBoardLogger(run_dir, name="tb", version=""), CSVLogger(run_dir, name="csv", version="")]
        if loggers
        else False
    )
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
        strategy=tr["strategy"],
        precision=tr["precision"],
        accumulate_grad_batches=tr["accumulate_grad_batches"],
        val_check_interval=tr["val_every"] * tr["accumulate_grad_batches"],
        check_val_every_n_epoch=None,
        log_every_n_steps=tr["log_every"],
        logger=logger,
        callbacks=cbs,
        enable_checkpointing=True,
        enable_progress_bar=tr["progress_bar"],
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=run_dir,
    )


def fit(config_path: str, overrides=(), resume: str | None = None, init_from: str | None = None) -> dict:
    """Train; returns {"run_dir", "val_loss", "val_bpb"}. Everything is validated before anything is written.

    ``init_from``: a checkpoint, run dir or exported model dir whose weights start the run, with a fresh
    optimizer, schedule and step count (Duo stage 3 from stage 1, a grown TokenFormer); see ``init_source``."""
    launched = RUN_DIR_ENV in os.environ  # set: we are a process that `strategy=ddp` launched
    try:
        return _fit(config_path, overrides, resume, init_from)
    finally:
        if not launched:
            os.environ.pop(RUN_DIR_ENV, None)


def init_source(cfg: dict, source: str) -> tuple[dict, torch.nn.Module, bool]:
    """The config and weights that ``--init-from`` starts from. The config's own model is kept when the source's
    weights fit it exactly (same names and shapes: e.g. Duo stage 3 = stage-1 weights with ``routing: router``);
    otherwise the source's model section replaces it (e.g. a grown TokenFormer, whose token counts differ)."""
    from arch import build_model

    src_cfg, src = load_trained(source)
    with torch.device("meta"):
        mine = build_model(cfg["model"])
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    if shapes(mine) == shapes(src):
        return cfg, src, False
    return load_config(None, (), base={**cfg, "model": src_cfg["model"]}), src, True


def _fit(config_path: str, overrides, resume: str | None, init_from: str | None) -> dict:
    cfg = load_config(config_path, overrides)
    classify = task_of(cfg) == "classification"
    if classify and (resume or init_from):
        raise ConfigError("--resume / --init-from: implemented for language models only")
    init_model = None
    if init_from:
        if resume:
            raise ConfigError(
                "--init-from and --resume exclude each other: resume continues a run, "
                "init-from starts a new one from trained weights"
            )
        cfg, init_model, replaced = init_source(cfg, init_from)
    ckpt_path = None
    if resume:
        ckpt_path = latest_checkpoint(resume) if Path(resume).is_dir() else Path(resume)
        saved = read_checkpoint(ckpt_path)["hyper_parameters"]["config"]
        if saved["model"] != cfg["model"]:
            raise CheckpointError(f"{ckpt_path}: its model config differs from {config_path}'s; cannot resume")
    run_dir = make_run_dir(cfg) if ckpt_path is None else ckpt_path.parent.parent
    os.environ[RUN_DIR_ENV] = str(run_dir)
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    steps, B = cfg["trainer"]["max_steps"], cfg["data"]["batch_size"]
    if classify:
        from .images import ImageDataModule

        data = ImageDataModule(cfg)
        data.setup()
        module = ClassifierModule(cfg)
        what = (
            f"{cfg['data']['source']['type']}: {len(data.splits['train'])} training / "
            f"{len(data.splits['validation'])} held-out images, {data.source.num_classes} classes, "
            f"{steps} steps of {B} images"
        )
    else:
        data = LMDataModule(cfg)
        data.setup()
        module = LMModule(cfg, data.bytes_per_token)
        what = (
            f"{len(data.splits['train']['tokens']) / 1e6:.2f}M training tokens, "
            f"{steps} steps of {B}x{cfg['data']['seq_len']} tokens"
        )
    if init_model is not None:
        module.model.load_state_dict(init_model.state_dict())
    n_params = sum(p.numel() for p in module.model.parameters())
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.yaml", lambda p: OmegaConf.save(OmegaConf.create(cfg), p))
        print(
            f"fit {cfg['name']}: {n_params / 1e6:.2f}M parameters, {what}\n"
            f"  run dir: {run_dir}  (config.yaml, checkpoints/, model/, tb/, csv/)"
            + (f"\n  resuming from {ckpt_path}" if ckpt_path else "")
            + (f"\n  weights initialised from {init_from} (fresh optimizer and schedule)" if init_from else "")
            + (
                f"\n  model section taken from {init_from}: its weights do not fit {config_path}'s model"
                if init_from and replaced
                else ""
            ),
            flush=True,
        )
    callbacks = [FreezeOldTokens()] if cfg["optim"]["freeze_old_tokens"] else []
    trainer = build_trainer(cfg, run_dir, callbacks)
    trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=True)
    val = trainer.validate(module, data, verbose=False, weights_only=True)[0]
    result = {"run_dir": run_dir, "val_loss": float(val["val/loss"])}
    if classify:
        result.update(val_acc1=float(val["val/acc1"]), val_acc5=float(val["val/acc5"]))
        report = (
            f"validation: loss {result['val_loss']:.4f}, top-1 {100 * result['val_acc1']:.2f}%, "
            f"top-5 {100 * result['val_acc5']:.2f}% (all {len(data.splits['validation'])} held-out images)"
        )
    else:
        result["val_bpb"] = bits_per_byte(result["val_loss"], data.bytes_per_token)
        report = (
            f"validation loss {result['val_loss']:.4f} nats/token, {result['val_bpb']:.4f} bits/byte "
            f"(held-out, {cfg['data']['val_batches'] or 'all'} batches)"
        )
    if trainer.is_global_zero:
        save_pretrained(module.model, run_dir / "model")
        print(report)
        print(f"exported {run_dir / 'model'} (model.safetensors + config.yaml)")
        if not classify and cfg["trainer"]["sample_tokens"] > 0:
            from .generate import generate_text

            text = generate_text(
                module.model, data.tokenizer, cfg["trainer"]["sample_prompt"], cfg["trainer"]["sample_tokens"]
            )
            print("sample:\n" + "-" * 72 + "\n" + text + "\n" + "-" * 72)
    return result
