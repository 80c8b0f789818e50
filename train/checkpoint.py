"""Checkpoints: written atomically (temp file + rename), read without unpickling code (``weights_only=True``).

Layout of a run directory ``runs/<config-name>/<timestamp>/``::

    config.yaml                     the resolved config
    checkpoints/step-000500.ckpt    Lightning checkpoints (model, optimizer, schedule, loop state), ordered by step
    checkpoints/abandoned-<time>/   checkpoints after the step a run was resumed from, set aside by the resume
    model/                          model.safetensors + config.yaml, exported at the end of fit
    tb/, csv/                       TensorBoard and CSV logs (csv/metrics.csv, then one folder per resumed segment)

A checkpoint is kept only once a loss computed with its weights is finite: it is written as
``step-N.ckpt.unconfirmed`` and renamed to ``step-N.ckpt`` after the next training batch's loss (or, at the end
of training and on a signal, a forward pass of the last batch); a non-finite loss deletes it and stops the run.
A run that diverges on the update just before a checkpoint therefore never leaves that checkpoint behind.

Released weights of a published model (``eval``/``info --weights FILE`` with a config YAML): the authors'
``torch.save({"model": state_dict, ...})`` file, read with ``weights_only=True`` and mapped onto our module names by
the model kind's converter (``_released_converters``), then loaded strictly.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import signal
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from arch.io import atomic_write, load_weights, read_config, state_mismatch

from .errors import CheckpointError, Interrupted, NonFiniteLossError
from .runs import run_dir_of  # noqa: F401  (re-exported: commands import it from here)

STEP_NAME = re.compile(r"^step-(\d+)\.ckpt$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}.ckpt"


def step_of(path: str | os.PathLike) -> int:
    """The step number of a ``step-N.ckpt`` file name (-1 for any other name)."""
    m = STEP_NAME.match(Path(path).name)
    return int(m[1]) if m else -1


def checkpoints_in(folder: str | os.PathLike) -> list[Path]:
    """The ``step-N.ckpt`` files of ``folder``, oldest first by step number (not by name: step 1,000,000 comes
    after step 999,999)."""
    return sorted((p for p in Path(folder).glob("step-*.ckpt") if step_of(p) >= 0), key=step_of)


def _refusal(path: Path, error: pickle.UnpicklingError) -> CheckpointError:
    """The error for a file holding pickled objects: it names the first one, and (unlike torch's message) does
    not invite loading it with ``weights_only=False``, which would run whatever code it carries."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return CheckpointError(
        f"{path}: refused: it holds pickled Python objects ({found[1]}), which checkpoints of this repo never "
        "contain, and unpickling them could run code; it is not loaded"
    )


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """``torch.load(weights_only=True)`` with an error that says what is wrong instead of a deep stack trace."""
    path = Path(path)
    if path.is_dir():
        path = latest_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if re.search(r"Unsupported global: GLOBAL", str(e)):  # not corruption: a pickled object, refused
            raise _refusal(path, e) from None
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a Lightning checkpoint of this repo (no state_dict)")
    return ckpt


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """The newest ``step-*.ckpt`` (by step number) in a run directory or its ``checkpoints/`` folder."""
    path = Path(path)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = checkpoints_in(folder)
    if found:
        return found[-1]
    if (path / "config.yaml").is_file() and not (path / "checkpoints").is_dir():
        raise CheckpointError(
            f"{path}: missing model.safetensors; an exported model directory holds model.safetensors beside "
            "config.yaml (a run directory: checkpoints/step-*.ckpt)"
        )
    raise CheckpointError(f"{folder}: no step-*.ckpt checkpoint found")


def set_aside_later(ckpt: Path) -> Optional[Path]:
    """Resuming a run from ``ckpt`` abandons its later checkpoints (and unconfirmed ones, and the model exported
    at its end): move them into ``checkpoints/abandoned-<time>/`` so that a later ``--resume RUN_DIR`` or ``eval``
    cannot pick them up. Returns that folder, or None when there was nothing later."""
    folder, run = ckpt.parent, ckpt.parent.parent
    later = [p for p in checkpoints_in(folder) if step_of(p) > step_of(ckpt)]
    later += sorted(folder.glob("*.unconfirmed"))
    if not later:
        return None
    base, n = folder / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}", 0
    dest = base
    while True:  # exclusive: two resumes in the same second get two folders
        try:
            dest.mkdir()
            break
        except FileExistsError:
            n += 1
            dest = base.with_name(f"{base.name}-{n}")
    for p in later:
        os.replace(p, dest / p.name)
    if (run / "model").is_dir():
        os.replace(run / "model", dest / "model")
    return dest


class AtomicCheckpointIO(CheckpointIO):
    """torch.save to a temp file beside the target, fsync, then rename: a crash never leaves half a checkpoint."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:  # through a Python file, a full disk raises OSError (not a bare RuntimeError)
                torch.save(checkpoint, f)

        atomic_write(path, save)

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict:
        return read_checkpoint(path, map_location or "cpu")

    def remove_checkpoint(self, path) -> None:
        if os.path.exists(path):
            os.unlink(path)


class PeriodicCheckpoint(Checkpoint):
    """Every ``every`` optimizer steps, at the end, and on SIGTERM / SIGINT, write ``step-NNNNNN.ckpt``, keeping
    the newest ``keep`` (-1: all).

    A ``Checkpoint`` subclass, so Lightning runs it after every other callback of the same hook: the state it
    saves includes their changes (e.g. frozen tokens written back).

    Confirmation (see the module docstring): the file is renamed to its final name only once a loss computed with
    its weights is finite, checked through the module's non-finite flag (``record_finite``, ``check_finite``).

    Signals: from the start of training, the first SIGTERM or SIGINT lets the current step finish, then writes and
    confirms a checkpoint and raises ``Interrupted``; a second one stops the process at once (the default action).
    Lightning's own SIGTERM handler (which ends the run with exit status 0 and no checkpoint) is replaced for the
    duration of training.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, dirpath: str | os.PathLike, every: int, keep: int = 2):
        self.dirpath, self.every, self.keep = Path(dirpath), every, keep
        self.pending: Optional[Path] = None  # written, not yet confirmed
        self.written_step = -1
        self.signum: Optional[int] = None
        self._batch = None
        self._handlers: dict = {}

    # ---- writing and confirming ----------------------------------------------------------------------------
    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == self.written_step:
            return
        pl_module.check_finite()
        path = self.dirpath / (checkpoint_name(trainer.global_step) + ".unconfirmed")
        trainer.save_checkpoint(path, weights_only=False)  # the full training state, for resuming
        self.pending, self.written_step = path, trainer.global_step

    def _confirm(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep the pending checkpoint if every loss so far is finite (the caller made sure one was computed with
        its weights); else delete it and stop."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        bad = trainer.strategy.reduce_boolean_decision(bool(pl_module.first_bad_step >= 0), all=False)
        if trainer.is_global_zero:
            if bad:
                pending.unlink(missing_ok=True)
            else:
                os.replace(pending, pending.with_suffix(""))  # step-N.ckpt
                for old in checkpoints_in(self.dirpath)[: -self.keep] if self.keep >= 0 else []:
                    old.unlink()
        if bad:
            pl_module.check_finite(dropped=self.written_step)

    def _confirm_now(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Confirm the pending checkpoint with a forward pass of the last training batch on its weights. The pass
        leaves no trace: buffers it updates (BatchNorm statistics) are restored, so the weights that go on to be
        validated and exported are the checkpoint's."""
        if self.pending is not None and self._batch is not None:
            buffers = [(b, b.clone()) for name, b in pl_module.named_buffers() if name != "first_bad_step"]
            with torch.no_grad(), trainer.precision_plugin.train_step_context():
                pl_module.record_finite(pl_module.loss(self._batch).detach())
            for b, saved in buffers:
                b.copy_(saved)
        self._confirm(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batch = batch
        self._confirm(trainer, pl_module)  # this batch's loss was computed with the pending checkpoint's weights
        if trainer.global_step % self.every == 0 and trainer.global_step > 0:
            self._write(trainer, pl_module)
        if self._stop_requested(trainer):
            self._write(trainer, pl_module)
            self._confirm_now(trainer, pl_module)
            name = signal.Signals(self.signum or signal.SIGTERM).name
            path = self.dirpath / checkpoint_name(trainer.global_step)
            raise Interrupted(self.signum or signal.SIGTERM, f"{name} after step {trainer.global_step}: wrote {path}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)
        self._confirm_now(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteLossError) and self.pending is not None and trainer.is_global_zero:
            self.pending.unlink(missing_ok=True)
            self.pending = None

    # ---- signals -------------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            self._handlers = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for s, handler in self._handlers.items():
            signal.signal(s, handler)
        self._handlers = {}

    def _on_signal(self, signum: int, frame) -> None:
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one stops the process at once
        name = signal.Signals(signum).name
        print(f"\n{name} received: stopping after this step with a checkpoint", file=sys.stderr, flush=True)

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        if trainer.world_size > 1:  # every process stops at the same step
            return trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False)
        return self.signum is not None


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
        try:
            return {"model": read_config(target), "name": Path(target).resolve().name}
        except ValueError as e:  # a malformed config.yaml
            raise CheckpointError(str(e)) from None
    return _config_of(read_checkpoint(target), target)


def load_trained(target: str | os.PathLike, overrides=(), map_location: Any = "cpu", report: bool = False):
    """(config, model) from a checkpoint file, a run directory (its newest checkpoint) or an exported model
    directory (``model.safetensors`` + ``config.yaml``). ``overrides`` apply to the saved config, so e.g. another
    ``model.mixer.type`` rebuilds the model with another mixer and loads the same weights. Every method's
    ``on_load`` hook runs after the weights are in. ``report``: print what the overrides changed in the saved
    config, and warn about sparse mixers that are dense at the config's sequence length."""
    from arch import build_model

    from .config import load_config
    from .methods import on_load
    from .runs import check_memory

    ckpt = None if is_exported(target) else read_checkpoint(target, map_location)
    saved = saved_config(target) if ckpt is None else _config_of(ckpt, target)
    cfg = load_config(None, overrides, base=saved)
    check_memory(cfg, training=False)
    model = build_model(cfg["model"])
    try:
        if ckpt is None:
            load_weights(model, Path(target) / "model.safetensors", map_location)
        else:
            state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k[:6] == "model."}
            model.load_state_dict(state)  # (load hooks may fill in keys, e.g. weights loaded from another file)
    except ValueError as e:  # load_weights names the file and what is wrong
        raise CheckpointError(str(e)) from None
    except RuntimeError as e:
        problem = state_mismatch(model, {k: tuple(v.shape) for k, v in state.items()}) or str(e).splitlines()[0]
        raise CheckpointError(f"{target}: weights do not fit the model of its config: {problem}") from None
    on_load(model, cfg)
    if report:
        report_load(saved, cfg, overrides, model)
    return cfg, model.to(map_location).eval()


def load_target(target: str | os.PathLike, overrides=(), weights: str | os.PathLike | None = None, report=False):
    """(config, model) for ``eval``/``info``-like commands: ``load_trained(target, overrides, report=report)``, or
    with ``weights`` (a released checkpoint file) the config YAML ``target`` with those weights (``load_released``)."""
    if weights is None:
        return load_trained(target, overrides, report=report)
    from .config import load_config

    cfg = load_config(target, overrides)
    return cfg, load_released(cfg, weights)


def _released_converters() -> dict:
    """model.kind -> converter of that kind's released checkpoints (a state dict in their names -> ours): the model
    classes that define ``convert_released``."""
    from arch.registry import MODELS  # importing arch registers every model kind

    classes = {kind: MODELS.get(kind, "model.kind") for kind in MODELS.names()}
    return {kind: cls.convert_released for kind, cls in classes.items() if hasattr(cls, "convert_released")}


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


def load_released(cfg: dict, path: str | os.PathLike, map_location: Any = "cpu") -> torch.nn.Module:
    """The model of ``cfg`` (a validated config) with the released weights of ``path`` loaded strictly, in eval mode."""
    from arch import build_model

    model = build_model(cfg["model"])
    state = read_released(path, cfg["model"]["kind"])
    problem = state_mismatch(model, {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise CheckpointError(f"--weights {path}: weights do not fit the model of the config: {problem}")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def _flat(d: Any, prefix: str) -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, sub in d.items() for k, v in _flat(sub, f"{prefix}.{key}").items()}


def changed_by(overrides, saved: dict, cfg: dict) -> list[str]:
    """``key: old -> new`` for every value that differs between the saved and the resolved config inside the
    blocks that ``overrides`` touch (``model.mixer.type=x`` -> everything under ``model.mixer``), so that the
    defaults a new block brings are shown too."""
    out = []
    for block in dict.fromkeys(o.split("=", 1)[0].rsplit(".", 1)[0] for o in overrides):
        old, new = saved, cfg
        for part in block.split("."):
            old = old.get(part, {}) if isinstance(old, dict) else {}
            new = new.get(part, {}) if isinstance(new, dict) else {}
        before, after = _flat(old, block), _flat(new, block)
        for key in dict.fromkeys([*before, *after]):
            if before.get(key, "-") != after.get(key, "-"):
                out.append(f"{key}: {before.get(key, '-')} -> {after.get(key, '-')}")
    return out


def dense_mixers(model: torch.nn.Module, seq_len: int) -> list[str]:
    """A line for each kind of sparse mixer in ``model`` whose forced tokens or budget cover a whole
    ``seq_len``-token context (``density(seq_len) == 1``: it computes exactly dense attention)."""
    layers: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        density = getattr(m, "density", None)
        if callable(density) and density(seq_len) >= 1.0:
            index = re.search(r"\.(\d+)\.", f".{name}.")
            layers.setdefault(getattr(type(m), "registry_name", type(m).__name__), []).append(
                int(index[1]) if index else -1
            )
    return [
        f"mixer {kind!r} (layers {', '.join(map(str, idx))}): at {seq_len} tokens its forced tokens and budget cover "
        "the whole context: effective density 1.00, i.e. dense attention"
        for kind, idx in layers.items()
    ]


def report_load(saved: dict, cfg: dict, overrides, model: torch.nn.Module) -> None:
    """Print what ``overrides`` changed in the saved config, and warn about sparse mixers that are dense here."""
    if overrides:
        print("overrides applied to the saved config: " + (", ".join(changed_by(overrides, saved, cfg)) or "none"))
    seq_len = cfg["data"].get("seq_len") or cfg["model"].get("max_seq_len")
    if seq_len:
        for line in dense_mixers(model, seq_len):
            print(f"warning: {line}")
