"""Pretrain a model from a config with Lightning.

    python -m train fit configs/lm/gpt-tiny.yaml [dotted.key=value ...] [--resume CKPT | --init-from PATH]

Everything is validated before anything is written: the config, the model's memory estimate against the
memory available, the data. The run directory ``<trainer.out_dir>/<name>/<timestamp>`` (created exclusively: two
runs never share one) receives config.yaml, checkpoints/, model/ (the exported weights), tb/ and csv/.

``--resume`` continues a run in its own directory (checkpoints after the one resumed from are set aside in
``checkpoints/abandoned-<time>/``; the CSV metrics of the new segment go to ``csv/<segment>/``); a checkpoint
that is not in a run's ``checkpoints/`` folder continues into a new run directory. SIGTERM or SIGINT during
training writes a checkpoint and exits with 143 or 130, printing the command that resumes the run.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

import torch

from arch.registry import ConfigError

from .cli import add_target
from .config import load_config, task_of
from .errors import CheckpointError, Interrupted
from .runs import RUN_DIR_ENV, check_memory, make_run_dir

# Lightning, the data and the LightningModule are imported where a run starts, so that `fit --help` and a config
# error answer at once.


def fit(config_path: str, overrides=(), resume: str | None = None, init_from: str | None = None) -> dict:
    """Train; returns {"run_dir", "val_loss", and "val_bpb" (LMs) or "val_acc1", "val_acc5" (classifiers)}.

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
    from .checkpoint import latest_checkpoint, saved_config

    ckpt_path = latest_checkpoint(resume) if Path(resume).is_dir() else Path(resume)
    if saved_config(ckpt_path)["model"] != cfg["model"]:
        raise CheckpointError(f"{ckpt_path}: its model config differs from {config_path}'s; cannot resume")
    return ckpt_path


def in_run_dir(ckpt_path: Path) -> bool:
    """Whether a checkpoint sits in a run directory's ``checkpoints/`` folder (a resume continues that run)."""
    return ckpt_path.parent.name == "checkpoints" and (ckpt_path.parent.parent / "config.yaml").is_file()


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
    if init_from and resume:
        raise ConfigError(
            "--init-from and --resume exclude each other: resume continues a run, "
            "init-from starts a new one from trained weights"
        )
    init_model, replaced = None, False
    if init_from:
        cfg, init_model, replaced = init_source(cfg, init_from)
    check_memory(cfg)  # before the model is allocated
    ckpt_path = resume_checkpoint(cfg, config_path, resume) if resume else None
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_only

    from .trainer import build_trainer

    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    data, module, what = build_task(cfg)  # the data checked (tokenizer, text, lengths) before anything is written
    if init_model is not None:
        module.model.load_state_dict(init_model.state_dict())
    run_dir, segment, set_aside = start_run(cfg, ckpt_path, rank_zero_only.rank == 0)
    if rank_zero_only.rank == 0:
        print(start_lines(cfg, module.model, what, run_dir, ckpt_path, set_aside))
        if init_from:
            print(f"  weights initialised from {init_from} (fresh optimizer and schedule)")
        if replaced:
            print(f"  model section taken from {init_from}: its weights do not fit {config_path}'s model")
    trainer = build_trainer(cfg, run_dir, [cb for h in module.hooks for cb in h.callbacks()], segment=segment)
    try:
        return train_and_export(cfg, trainer, module, data, ckpt_path, run_dir)
    except Interrupted as e:
        resume_cmd = shlex.join(
            ["python", "-m", "train", "fit", str(config_path), *overrides, "--resume", str(run_dir)]
        )
        raise Interrupted(e.signum, f"{e}; resume with: {resume_cmd}") from None
    except OSError as e:  # name the run when the OS did not name the file (e.g. a full disk under a logger)
        raise OSError(e.errno, e.strerror or str(e), e.filename or str(run_dir)) from None


def start_run(cfg: dict, ckpt_path: Path | None, rank_zero: bool) -> tuple[Path, str, Path | None]:
    """(run directory, CSV log segment, folder of the checkpoints set aside) of a run: a resume from a run's
    own checkpoint continues in that run (its later checkpoints set aside, a new CSV segment), anything else gets
    a new run directory. Writes the resolved config."""
    import time

    from omegaconf import OmegaConf

    from arch.io import atomic_write

    from .checkpoint import set_aside_later, step_of

    segment, moved = "", None
    if ckpt_path is not None and in_run_dir(ckpt_path):
        run_dir = ckpt_path.parent.parent
        segment = f"from-step-{max(step_of(ckpt_path), 0):06d}-{time.strftime('%Y%m%d-%H%M%S')}"
        moved = set_aside_later(ckpt_path) if rank_zero and RUN_DIR_ENV not in os.environ else None
    else:
        run_dir = make_run_dir(cfg)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    if rank_zero:
        atomic_write(run_dir / "config.yaml", lambda p: OmegaConf.save(OmegaConf.create(cfg), p))
    return run_dir, segment, moved


def start_lines(cfg: dict, model, what: str, run_dir: Path, ckpt_path: Path | None, set_aside: Path | None) -> str:
    """What ``fit`` prints as a run starts: the model and data, the run directory, and on a resume the checkpoint
    it continues from and where the abandoned later checkpoints went."""
    n_params = sum(p.numel() for p in model.parameters())
    lines = [f"fit {cfg['name']}: {n_params / 1e6:.2f}M parameters, {what}"]
    lines.append(f"  run dir: {run_dir}  (config.yaml, checkpoints/, model/, tb/, csv/)")
    if ckpt_path:
        lines.append(f"  resuming from {ckpt_path}")
    if set_aside:
        lines.append(f"  the run's later checkpoints (and export) moved to {set_aside}: resuming abandons them")
    return "\n".join(lines)


def train_and_export(cfg: dict, trainer, module, data, ckpt_path: Path | None, run_dir: Path) -> dict:
    """Train, validate on the held-out split, export the model and report."""
    from arch.io import save_pretrained

    from .data import bits_per_byte
    from .distributed import final_validation

    trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=True)
    val, model = final_validation(trainer, module, data)  # every process (FSDP gathers the shards)
    result = {"run_dir": run_dir, "val_loss": float(val["val/loss"])}
    if trainer.is_global_zero:
        save_pretrained(model, run_dir / "model")
    if task_of(cfg) == "classification":
        result.update(val_acc1=float(val["val/acc1"]), val_acc5=float(val["val/acc5"]))
    else:
        result["val_bpb"] = bits_per_byte(result["val_loss"], data.bytes_per_token)
    if trainer.is_global_zero:
        report(cfg, result, data, model, run_dir)
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
