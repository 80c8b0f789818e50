"""Export and load: ``model.safetensors`` + ``config.yaml`` (the resolved ``model:`` mapping)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash never leaves a half-written file at ``path``.

    Any ``OSError`` (read-only folder, a file where a folder should be, a full disk) is raised again naming
    ``path`` (``e.filename``), so that the caller can report one line saying where the write failed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path.name} there ({e.strerror or e})", e.filename or str(path)) from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        cause = os_error_of(e)
        if cause is None:
            raise
        raise OSError(cause.errno, f"writing failed ({cause.strerror or cause})", str(path)) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def os_error_of(e: BaseException) -> OSError | None:
    """The OS error behind an exception: the exception itself, one it was raised while handling (torch.save
    fails with a RuntimeError after the OSError of a full disk), or one named in its message (``os error 28``,
    as libraries written in Rust report it); None if there is none."""
    while e is not None:
        if isinstance(e, OSError):
            return e
        code = re.search(r"os error (\d+)", str(e))
        if code:
            return OSError(int(code[1]), os.strerror(int(code[1])))
        e = e.__cause__ or e.__context__
    return None


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``config.yaml`` into ``directory`` (atomically); returns the directory."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    directory = Path(directory)
    atomic_write(directory / "config.yaml", lambda p: OmegaConf.save(OmegaConf.create(model.config), p))
    atomic_write(directory / "model.safetensors", lambda p: save_model(model, p))
    return directory


def state_mismatch(model: nn.Module, saved: dict, limit: int = 3) -> str:
    """The first differences between ``model``'s state and ``saved`` ({name: shape}): keys whose shapes differ
    (with both shapes), then missing and unexpected keys; ``""`` when every shared key's shape agrees."""
    state = model.state_dict()
    mine = {k: tuple(v.shape) for k, v in state.items()}
    shapes = [f"{k} {tuple(saved[k])} in the file, {s} in the model" for k, s in mine.items() if k in saved]
    shapes = [x for k, x in zip([k for k in mine if k in saved], shapes) if tuple(saved[k]) != mine[k]]
    # a tied tensor is saved once, under one of its names
    ptr_saved = {state[k].data_ptr() for k in state if k in saved and state[k].device.type != "meta"}
    tied = {k for k, v in state.items() if v.device.type != "meta" and v.data_ptr() in ptr_saved}
    missing = [k for k in mine if k not in saved and k not in tied]
    unexpected = [k for k in saved if k not in mine]
    parts = []
    for what, items in (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{what}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_weights(model: nn.Module, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a ``model.safetensors`` into ``model`` (strict; shared/tied tensors handled); clear error if corrupt or
    if the tensors do not fit (naming the first mismatching keys and their shapes)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_model

    try:
        with safe_open(str(path), "pt") as f:
            saved = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is corrupt: {str(e).splitlines()[0]}") from None
    try:
        missing, unexpected = load_model(model, path, strict=False, device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        detail = state_mismatch(model, saved) or str(e).splitlines()[0]
        raise ValueError(f"{path} does not fit the model: {detail}") from None
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: {state_mismatch(model, saved)}")
    return model


def read_config(directory: str | os.PathLike) -> dict:
    """The ``model:`` mapping saved in an exported model directory (``config.yaml`` beside ``model.safetensors``)."""
    from omegaconf import DictConfig, OmegaConf

    directory = Path(directory)
    for name in ("config.yaml", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: missing {name}; expected a directory written by save_pretrained")
    try:
        cfg = OmegaConf.load(directory / "config.yaml")
    except Exception as e:  # yaml errors come in several types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{directory / 'config.yaml'}: not valid YAML ({first})") from None
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{directory / 'config.yaml'}: expected a mapping of model keys, got {cfg!r}")
    return OmegaConf.to_container(cfg)


def load_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model from ``config.yaml`` and load ``model.safetensors`` (no pickle)."""
    from . import build_model

    model = build_model(read_config(directory))
    return load_weights(model, Path(directory) / "model.safetensors", map_location).to(map_location)
