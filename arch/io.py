"""Export and load: ``model.safetensors`` + ``config.yaml`` (the resolved ``model:`` mapping)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash never leaves a half-written file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``config.yaml`` into ``directory`` (atomically); returns the directory."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    directory = Path(directory)
    atomic_write(directory / "config.yaml", lambda p: OmegaConf.save(OmegaConf.create(model.config), p))
    atomic_write(directory / "model.safetensors", lambda p: save_model(model, p))
    return directory


def load_weights(model: nn.Module, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a ``model.safetensors`` into ``model`` (strict; shared/tied tensors handled); clear error if corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, path, strict=False, device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is corrupt or does not match the model: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing {missing}, unexpected {unexpected}")
    return model


def read_config(directory: str | os.PathLike) -> dict:
    """The ``model:`` mapping saved in an exported model directory (``config.yaml`` beside ``model.safetensors``)."""
    from omegaconf import OmegaConf

    directory = Path(directory)
    for name in ("config.yaml", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: missing {name}; expected a directory written by save_pretrained")
    return OmegaConf.to_container(OmegaConf.load(directory / "config.yaml"))


def load_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model from ``config.yaml`` and load ``model.safetensors`` (no pickle)."""
    from . import build_model

    model = build_model(read_config(directory))
    return load_weights(model, Path(directory) / "model.safetensors", map_location).to(map_location)
