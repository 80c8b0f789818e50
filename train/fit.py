"""Pretrain a model from a config with Lightning.

    python -m train fit configs/lm/gpt-tiny.yaml [dotted.key=value ...] [--resume CKPT | --init-from PATH]

Everything is validated before anything is written. The run directory ``<trainer.out_dir>/<name>/<timestamp>``
receives config.yaml, checkpoints/, model/ (the exported weights; also model-ema/ for a classifier with
optim.ema_decay), tb/ and csv/.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from arch.registry import ConfigError

from .cli import add_target
from .config import load_config, task_of
from .errors import CheckpointError
from .runs import RUN_DIR_ENV, make_run_dir

# Lightning, the data and the LightningModule are imported where a run starts, so that `fit --help` and a config
# error answer at once.


def fit(config_path: str, overrides=(), resume: str | None = None, init_from: str | None = None) -> dict:
    """Train; returns {"run_dir", "val_loss", and "val_bpb" (LMs) or "val_acc1", "val_acc5" (classifiers; with
    optim.ema_decay also "val_ema_loss", "val_ema_acc1", "val_ema_acc5" of the EMA weights, exported to model-ema/)}.

    ``init_from``: a checkpoint, run dir or exported model dir whose weights start the run, with a fresh
    optimizer, schedule and step count; see ``init_source``."""
    launched = RUN_DIR_ENV in os.environ  # set: we are a process that `strategy=ddp` launched
    try:
        return _fit(config_path, overrides, resume, init_from)
    finally:
        if not launched:
            os.environ.pop(RUN_DIR_ENV, None)


def init_source(cfg: dict, source: str) -> tuple[dict, torch.nn.Module, bool]:
    """The config and weights that ``--init-from`` starts from. The config's own model is kept when the source's
    weights fit it exactly (same names and shapes: e.g. the same blocks with another routing mode); otherwise
    the source's model section replaces it (e.g. a model whose parameter shapes were changed after training)."""
    from arch import build_model

    from .checkpoint import load_trained

    src_cfg, src = load_trained(source)
    with torch.device("meta"):
        mine = build_model(cfg["model"])
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    if shapes(mine) == shapes(src):
        return cfg, src, False
    return load_config(None, (), base={**cfg, "model": src_cfg["model"]}), src, True


def resume_checkpoint(cfg: dict, config_path: str, resume: str) -> Path:
    """The checkpoint ``--resume`` names (a file, or a run dir's newest), checked against the config's model."""
    from .checkpoint import latest_checkpoint, read_checkpoint

    ckpt_path = latest_checkpoint(resume) if Path(resume).is_dir() else Path(resume)
    saved = read_checkpoint(ckpt_path)["hyper_parameters"]["config"]
    if saved["model"] != cfg["model"]:
        raise CheckpointError(f"{ckpt_path}: its model config differs from {config_path}'s; cannot resume")
    return ckpt_path


def build_task(cfg: dict):
    """(data module, LightningModule, one-line description of the data) for the config's task."""
    from .module import ClassifierModule, LMModule

    steps, B = cfg["trainer"]["max_steps"], cfg["data"]["batch_size"]
    if task_of(cfg) == "classification":
        from .datamodules import ImageDataModule

        data = ImageDataModule(cfg)
        data.setup()
        split = data.splits
        return (
            data,
            ClassifierModule(cfg),
            (
                f"{cfg['data']['source']['type']}: {len(split['train'])} training / {len(split['validation'])} "
                f"held-out images, {data.source.num_classes} classes, {steps} steps of {B} images"
            ),
        )
    from .datamodules import LMDataModule

    data = LMDataModule(cfg)
    data.setup()
    n_train = len(data.splits["train"]["tokens"])
    what = f"{n_train / 1e6:.2f}M training tokens, {steps} steps of {B}x{cfg['data']['seq_len']} tokens"
    return data, LMModule(cfg, data.bytes_per_token), what


def _fit(config_path: str, overrides, resume: str | None, init_from: str | None) -> dict:
    cfg = load_config(config_path, overrides)  # every key checked before anything heavy is imported
    classify = task_of(cfg) == "classification"
    if classify and (resume or init_from):
        raise ConfigError("--resume / --init-from: implemented for language models only")
    if classify:
        from .images import require_timm

        require_timm(cfg["data"]["augment"])
    if init_from and resume:
        raise ConfigError(
            "--init-from and --resume exclude each other: resume continues a run, "
            "init-from starts a new one from trained weights"
        )
    init_model, replaced = None, False
    if init_from:
        cfg, init_model, replaced = init_source(cfg, init_from)
    ckpt_path = resume_checkpoint(cfg, config_path, resume) if resume else None
    run_dir = make_run_dir(cfg) if ckpt_path is None else ckpt_path.parent.parent
    os.environ[RUN_DIR_ENV] = str(run_dir)
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_only
    from omegaconf import OmegaConf

    from arch.io import atomic_write, save_pretrained

    from .data import bits_per_byte
    from .trainer import build_trainer

    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    data, module, what = build_task(cfg)
    if init_model is not None:
        module.model.load_state_dict(init_model.state_dict())
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.yaml", lambda p: OmegaConf.save(OmegaConf.create(cfg), p))
        n_params = sum(p.numel() for p in module.model.parameters())
        print(f"fit {cfg['name']}: {n_params / 1e6:.2f}M parameters, {what}")
        print(f"  run dir: {run_dir}  (config.yaml, checkpoints/, model/, tb/, csv/)")
        if ckpt_path:
            print(f"  resuming from {ckpt_path}")
        if init_from:
            print(f"  weights initialised from {init_from} (fresh optimizer and schedule)")
        if replaced:
            print(f"  model section taken from {init_from}: its weights do not fit {config_path}'s model")
    trainer = build_trainer(cfg, run_dir, [cb for h in module.hooks for cb in h.callbacks()])
    trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=True)
    val = trainer.validate(module, data, verbose=False, weights_only=True)[0]
    result = {"run_dir": run_dir, "val_loss": float(val["val/loss"])}
    if trainer.is_global_zero:
        save_pretrained(module.model, run_dir / "model")
    if classify and module.ema is not None:
        result.update({f"val_ema_{k}": float(val[f"val_ema/{k}"]) for k in ("loss", "acc1", "acc5")})
        if trainer.is_global_zero:
            save_pretrained(module.ema.module, run_dir / "model-ema")
    if classify:
        result.update(val_acc1=float(val["val/acc1"]), val_acc5=float(val["val/acc5"]))
    else:
        result["val_bpb"] = bits_per_byte(result["val_loss"], data.bytes_per_token)
    if trainer.is_global_zero:
        report(cfg, result, data, module.model, run_dir)
    return result


def report(cfg: dict, result: dict, data, model: torch.nn.Module, run_dir: Path) -> None:
    """The end of ``fit``: held-out metrics, where the model went, and (LMs) a sample."""
    if "val_acc1" in result:
        print(
            f"validation: loss {result['val_loss']:.4f}, top-1 {100 * result['val_acc1']:.2f}%, "
            f"top-5 {100 * result['val_acc5']:.2f}% (all {len(data.splits['validation'])} held-out images)"
        )
    else:
        print(
            f"validation loss {result['val_loss']:.4f} nats/token, {result['val_bpb']:.4f} bits/byte "
            f"(held-out, {cfg['data']['val_batches'] or 'all'} batches)"
        )
    if "val_ema_acc1" in result:
        print(
            f"validation of the EMA weights (optim.ema_decay={cfg['optim']['ema_decay']}): loss "
            f"{result['val_ema_loss']:.4f}, top-1 {100 * result['val_ema_acc1']:.2f}%, top-5 "
            f"{100 * result['val_ema_acc5']:.2f}%; exported {run_dir / 'model-ema'}"
        )
    print(f"exported {run_dir / 'model'} (model.safetensors + config.yaml)")
    if "val_bpb" in result and cfg["trainer"]["sample_tokens"] > 0:
        from .generate import generate_text

        tr = cfg["trainer"]
        text = generate_text(model, data.tokenizer, tr["sample_prompt"], tr["sample_tokens"])
        print("sample:\n" + "-" * 72 + "\n" + text + "\n" + "-" * 72)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target(p, "config YAML")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (or run dir: its newest checkpoint)")
    p.add_argument(
        "--init-from",
        metavar="PATH",
        help="start from the weights of a checkpoint, run dir or exported model dir with a fresh "
        "optimizer and schedule: into this config's model if they fit it exactly, else into PATH's own model "
        "(e.g. one whose shapes were changed after training)",
    )


def run(args: argparse.Namespace) -> None:
    fit(args.target, args.overrides, resume=args.resume, init_from=args.init_from)
