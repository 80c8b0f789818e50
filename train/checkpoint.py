"""Checkpoints: written atomically (temp file + rename), read without unpickling code (``weights_only=True``).

Layout of a run directory ``runs/<config-name>/<timestamp>/``::

    config.yaml                     the resolved config
    checkpoints/step-000500.ckpt    Lightning checkpoints (model, optimizer, schedule, loop state)
    model/                          model.safetensors + config.yaml, exported at the end of fit
    tb/, csv/                       TensorBoard and CSV logs

Released weights of a published model (``eval``/``info --weights FILE`` with a config YAML): the authors'
``torch.save({"model": state_dict, ...})`` file, read with ``weights_only=True`` and mapped onto our module names by
the model kind's converter (``RELEASED_CONVERTERS``), then loaded strictly.
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from arch.io import atomic_write, load_weights, read_config

from .errors import CheckpointError
from .runs import run_dir_of  # noqa: F401  (re-exported: commands import it from here)


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """``torch.load(weights_only=True)`` with an error that says what is wrong instead of a deep stack trace."""
    path = Path(path)
    if path.is_dir():
        path = latest_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a Lightning checkpoint of this repo (no state_dict)")
    return ckpt


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """The newest ``step-*.ckpt`` in a run directory or its ``checkpoints/`` folder."""
    path = Path(path)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = sorted(folder.glob("step-*.ckpt"))
    if not found:
        raise CheckpointError(f"{path}: no step-*.ckpt checkpoint found")
    return found[-1]


class AtomicCheckpointIO(CheckpointIO):
    """torch.save to a temp file beside the target, fsync, then rename: a crash never leaves half a checkpoint."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict:
        return read_checkpoint(path, map_location or "cpu")

    def remove_checkpoint(self, path) -> None:
        if os.path.exists(path):
            os.unlink(path)


class PeriodicCheckpoint(Checkpoint):
    """Every ``every`` optimizer steps (and at the end) write ``step-NNNNNN.ckpt``, keeping the newest ``keep``.

    A ``Checkpoint`` subclass, so Lightning runs it after every other callback of the same hook: the state it
    saves includes their changes (e.g. frozen tokens written back).

    Before writing, the module's non-finite-loss flag is checked: a NaN run stops *before* saving, so the
    newest checkpoint on disk is always a good one.
    """

    def __init__(self, dirpath: str | os.PathLike, every: int, keep: int = 2):
        self.dirpath, self.every, self.keep = Path(dirpath), every, keep

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.check_finite()
        path = self.dirpath / f"step-{trainer.global_step:06d}.ckpt"
        if path.exists():
            return
        trainer.save_checkpoint(path, weights_only=False)  # the full training state, for resuming
        if trainer.is_global_zero and self.keep >= 0:
            for old in sorted(self.dirpath.glob("step-*.ckpt"))[: -self.keep]:
                old.unlink()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0 and trainer.global_step > 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)


def is_exported(target: str | os.PathLike) -> bool:
    """Whether ``target`` is an exported model directory (``model.safetensors`` + ``config.yaml``)."""
    return (Path(target) / "model.safetensors").is_file()


def _config_of(ckpt: dict, target: str | os.PathLike) -> dict:
    try:
        return ckpt["hyper_parameters"]["config"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{target}: checkpoint has no saved config (hyper_parameters.config)") from None


def saved_config(target: str | os.PathLike) -> dict:
    """The config saved with a checkpoint file, run directory or exported model directory, before overrides and
    without building the model: ``load_config(None, overrides, base=saved_config(target))`` is the config
    ``load_trained(target, overrides)`` builds, so several override sets can be checked with one read."""
    if is_exported(target):
        return {"model": read_config(target), "name": Path(target).name}
    return _config_of(read_checkpoint(target), target)


def load_trained(target: str | os.PathLike, overrides=(), map_location: Any = "cpu"):
    """(config, model) from a checkpoint file, a run directory (its newest checkpoint) or an exported model
    directory (``model.safetensors`` + ``config.yaml``). ``overrides`` apply to the saved config, so e.g. another
    ``model.mixer.type`` rebuilds the model with another mixer and loads the same weights. Every method's
    ``on_load`` hook runs after the weights are in."""
    from arch import build_model

    from .config import load_config
    from .methods import on_load

    ckpt = None if is_exported(target) else read_checkpoint(target, map_location)
    saved = saved_config(target) if ckpt is None else _config_of(ckpt, target)
    cfg = load_config(None, overrides, base=saved)
    model = build_model(cfg["model"])
    try:
        if ckpt is None:
            load_weights(model, Path(target) / "model.safetensors", map_location)
        else:
            model.load_state_dict({k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k[:6] == "model."})
    except ValueError as e:  # load_weights names the file and what is wrong
        raise CheckpointError(str(e)) from None
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{target}: weights do not fit the model of its config: {first}") from None
    on_load(model, cfg)
    return cfg, model.to(map_location).eval()


def load_target(target: str | os.PathLike, overrides=(), weights: str | os.PathLike | None = None):
    """(config, model) for ``eval``/``info``-like commands: ``load_trained(target, overrides)``, or with ``weights``
    (a released checkpoint file) the config YAML ``target`` with those weights (``load_released``)."""
    if weights is None:
        return load_trained(target, overrides)
    from .config import load_config

    cfg = load_config(target, overrides)
    return cfg, load_released(cfg, weights)


def _released_converters() -> dict:
    """model.kind -> converter of that kind's released checkpoints (a state dict in their names -> ours)."""
    from arch.biformer import convert_official_state_dict

    return {"biformer": convert_official_state_dict}


def read_released(path: str | os.PathLike, kind: str) -> dict:
    """The state dict of a released checkpoint ``path`` for ``model.kind`` ``kind``, in our names. The file is
    read with ``weights_only=True`` (``argparse.Namespace`` allowed: training scripts save their ``args``)."""
    converters = _released_converters()
    if kind not in converters:
        raise CheckpointError(
            f"--weights: released checkpoints load for model.kind {', '.join(converters)}; "
            f"this config's model.kind is {kind!r}"
        )
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--weights: {path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"--weights: {path}: cannot be read with weights_only=True ({first}); save its weights alone, "
            "e.g. torch.save({'model': ckpt['model']}, 'weights.pth'), where the file can be trusted"
        ) from None
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.get("model", ckpt).values()):
        raise CheckpointError(f"--weights: {path}: expected a state dict or a dict with a 'model' state dict")
    try:
        return converters[kind](ckpt)
    except ValueError as e:
        raise CheckpointError(f"--weights: {path}: {e}") from None


def load_state_strictly(model: torch.nn.Module, state: dict, source: str) -> None:
    """``model.load_state_dict(state)`` (strict), with an error naming the missing, unexpected and mis-shaped keys
    (at most three of each) instead of torch's full listing."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    problems = []
    for what, keys in (
        ("missing", [k for k in want if k not in got]),
        ("unexpected", [k for k in got if k not in want]),
        ("shape", [f"{k} {list(got[k])} (model: {list(want[k])})" for k in want if k in got and got[k] != want[k]]),
    ):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {what}: {', '.join(keys[:3])}{more}")
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the model of the config: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def load_released(cfg: dict, path: str | os.PathLike, map_location: Any = "cpu") -> torch.nn.Module:
    """The model of ``cfg`` (a validated config) with the released weights of ``path`` loaded strictly, in eval mode."""
    from arch import build_model

    model = build_model(cfg["model"])
    load_state_strictly(model, read_released(path, cfg["model"]["kind"]), f"--weights {path}")
    return model.to(map_location).eval()
