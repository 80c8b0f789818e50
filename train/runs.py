"""Where a run writes (run directories) and computes (its device); kept free of heavy imports."""

from __future__ import annotations

import os
import time
from pathlib import Path

RUN_DIR_ENV = "ADAPTIVE_COMPUTE_RUN_DIR"  # shared with the processes that `strategy=ddp` launches


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


def run_dir_of(target: str | os.PathLike) -> Path:
    """Where a command writes its outputs by default: a run or model directory itself, a checkpoint file's run
    directory (the folder above ``checkpoints/``)."""
    target = Path(target)
    if target.is_dir():
        return target
    return target.parent.parent if target.parent.name == "checkpoints" else target.parent


def device_for(accelerator: str = "auto"):
    """The torch device of a command: CUDA when asked for (``auto``, ``gpu``, ``cuda``) and available, else CPU."""
    import torch

    return torch.device("cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu")
