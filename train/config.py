"""Experiment configs: YAML files with top-level keys ``model``, ``data``, ``optim``, ``trainer``, ``seed``.

* ``base: other.yaml`` (path relative to the file) makes a config extend another one; the child's keys
  override the base's, recursively.
* ``${...}`` interpolation is OmegaConf's (e.g. ``data.seq_len: ${model.max_seq_len}``).
* Command-line overrides are OmegaConf dotlists: ``trainer.max_steps=100 model.mixer.type=dense``.
* Merging (base <- child, config <- overrides) is recursive, except that a block spec whose ``type`` changes is
  replaced whole: the old type's options do not leak into the new one (``arch.config.merge``).

``load_config`` merges and validates everything (model included) and returns a plain dict; nothing is
written and nothing trains before the whole config has been checked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from arch.config import merge, to_plain
from arch.registry import ConfigError, check_fields, fields_of_dataclass

TOP_LEVEL = ("model", "data", "optim", "trainer", "seed", "name", "base")


@dataclasses.dataclass
class DataConfig:
    source: Any = "shakespeare"  # a data source spec: name or {type: name, ...} (see train.data.SOURCES)
    tokenizer: str = "byte"  # "byte" (vocab 256, no download) or the path of a `tokenizers` JSON file
    batch_size: int = 32
    seq_len: Optional[int] = None  # None = model.max_seq_len
    val_batches: Optional[int] = 50  # batches per periodic validation; None = the whole held-out split
    cache_dir: str = "~/.cache/adaptive-compute"
    augment: dict = dataclasses.field(default_factory=dict)  # image classification: see train.images.AugmentConfig
    num_workers: int = 0  # image classification: DataLoader worker processes


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine decays to this at trainer.max_steps
    warmup_steps: int = 100
    weight_decay: float = 0.1  # not applied to norms, biases, embeddings
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    label_smoothing: float = 0.0  # image classification: cross-entropy against (1 - ε) one-hot + ε / classes
    ema_decay: float = 0.0  # image classification: EMA of the weights per optimizer step, evaluated too; 0 = off
    # methods add their own optim.* keys (train.methods.Method.optim_fields)


@dataclasses.dataclass
class TrainerConfig:
    max_steps: int = 1000
    accelerator: str = "auto"
    devices: Union[int, str] = 1
    strategy: str = "auto"  # e.g. ddp (gloo on CPU, NCCL on GPU), fsdp
    precision: Literal["32", "32-true", "bf16-mixed", "bf16-true", "16-mixed"] = "32"
    compile: bool = False
    accumulate_grad_batches: int = 1
    log_every: int = 10
    val_every: int = 250
    ckpt_every: int = 500
    keep_checkpoints: int = 2  # newest step checkpoints kept; -1 keeps all
    out_dir: str = "runs"
    progress_bar: bool = True
    sample_tokens: int = 400  # sample printed at the end of `fit`; 0 disables
    sample_prompt: str = "\n"


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "trainer": TrainerConfig}


def _load_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in chain:
        raise ConfigError(f"{path}: 'base' chain loops: {' -> '.join(str(p) for p in chain + (path,))}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml errors come in several types
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    cfg = OmegaConf.to_container(cfg, resolve=False)  # interpolations resolve after all merging
    base = cfg.pop("base", None)
    if base is None:
        return cfg
    return merge(_load_yaml(path.parent / str(base), chain + (path,)), cfg)


def load_config(path: str | Path | None, overrides: Sequence[str] = (), base: Mapping | None = None) -> dict:
    """Read ``path`` (following ``base:``), or start from ``base`` (e.g. a checkpoint's saved config), apply
    dotlist ``overrides``, resolve interpolations and validate every section. Returns a plain dict."""
    cfg = _load_yaml(Path(path)) if path is not None else to_plain(dict(base or {}))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. trainer.max_steps=100")
    try:
        cfg = merge(cfg, OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=False))
        plain = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config: {e}") from None
    if "name" not in plain:
        plain["name"] = Path(path).stem if path is not None else "model"
    return validate(plain)


def validate(cfg: Mapping) -> dict:
    """Check the whole experiment config (model included, built on the meta device). Returns it resolved."""
    from .methods import load_methods, optim_fields

    cfg = dict(to_plain(cfg))
    unknown = [k for k in cfg if k not in TOP_LEVEL]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown top-level key; allowed keys: {', '.join(TOP_LEVEL)}")
    if "model" not in cfg:
        raise ConfigError("model: required key is missing")
    for key, schema in SECTIONS.items():
        extra = optim_fields() if key == "optim" else []
        cfg[key] = check_fields(cfg.get(key) or {}, fields_of_dataclass(schema) + extra, key)
    cfg["seed"] = int(cfg.get("seed", 0))
    cfg["model"] = _check_model(cfg["model"])
    _check_data(cfg)
    _check_trainer(cfg["trainer"])
    if cfg["optim"]["warmup_steps"] < 0 or len(cfg["optim"]["betas"]) != 2:
        raise ConfigError("optim: warmup_steps must be >= 0 and betas a list of two floats")
    for method in load_methods().values():
        method.validate(cfg)
    return cfg


def _check_model(model_cfg: dict) -> dict:
    """The model section resolved by building the model on the meta device (no memory, every key checked)."""
    import torch

    from arch import build_model

    with torch.device("meta"):
        return dict(build_model(model_cfg).config)


def _check_data(cfg: dict) -> None:
    from . import images
    from .data import SOURCES

    data = cfg["data"]
    data["source"] = SOURCES.build_spec(data["source"], "data.source")
    task, source_task = task_of(cfg), getattr(SOURCES.get(data["source"]["type"], ""), "task", "lm")
    if task != source_task:
        raise ConfigError(
            f"data.source.type: {data['source']['type']!r} is a {source_task} source but "
            f"model.kind {cfg['model']['kind']!r} is a {task} model"
        )
    if task == "classification":
        data["augment"] = check_fields(data["augment"], fields_of_dataclass(images.AugmentConfig), "data.augment")
        images.check_augment(data["augment"], data["batch_size"])
    elif data["augment"]:
        raise ConfigError("data.augment: only image classification models take augmentation")
    _check_recipe(cfg["optim"], task)
    if task == "lm" and data["seq_len"] is None:
        data["seq_len"] = cfg["model"]["max_seq_len"]
    if task == "lm" and data["seq_len"] > cfg["model"]["max_seq_len"]:
        raise ConfigError(f"data.seq_len: {data['seq_len']} exceeds model.max_seq_len={cfg['model']['max_seq_len']}")
    if data["batch_size"] < 1:
        raise ConfigError(f"data.batch_size: must be >= 1, got {data['batch_size']}")


def _check_recipe(optim: dict, task: str) -> None:
    for key in ("label_smoothing", "ema_decay"):
        if optim[key] and task != "classification":
            raise ConfigError(f"optim.{key}: implemented for image classification models only (0 = off)")
        if not 0 <= optim[key] < 1:
            raise ConfigError(f"optim.{key}: must be in [0, 1), got {optim[key]}")


def _check_trainer(trainer: dict) -> None:
    for key in ("max_steps", "log_every", "val_every", "ckpt_every", "accumulate_grad_batches"):
        if trainer[key] < 1:
            raise ConfigError(f"trainer.{key}: must be >= 1, got {trainer[key]}")
    if trainer["keep_checkpoints"] == 0 or trainer["keep_checkpoints"] < -1:
        raise ConfigError("trainer.keep_checkpoints: must be >= 1, or -1 to keep every checkpoint")


def task_of(cfg: Mapping) -> str:
    """``"lm"`` or ``"classification"``: what the config's model kind is trained for."""
    from arch import MODELS

    return getattr(MODELS.get(cfg["model"].get("kind", "lm"), "model.kind"), "task", "lm")
