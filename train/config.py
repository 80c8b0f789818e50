"""Experiment configs: YAML files with top-level keys ``model``, ``data``, ``optim``, ``trainer``, ``seed``.

* ``base: other.yaml`` (path relative to the file) makes a config extend another one; the child's keys
  override the base's, recursively.
* ``${...}`` interpolation is OmegaConf's (e.g. ``data.seq_len: ${model.max_seq_len}``).
* Command-line overrides are OmegaConf dotlists: ``trainer.max_steps=100 model.mixer.type=dense``.
* Merging (base <- child, config <- overrides) is recursive, except that a block spec whose ``type`` changes is
  replaced whole: the old type's options do not leak into the new one (``arch.config.merge``).
* ``${oc.env:VAR}`` is refused: the resolved config is saved in ``config.yaml`` and in every checkpoint, so an
  environment variable (a token, a password) would be written to disk. Pass such values on the command line.

``load_config`` merges and validates everything (model included) and returns a plain dict; nothing is
written and nothing trains before the whole config has been checked.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from arch.config import merge, to_plain
from arch.registry import ConfigError, check_fields, check_value, fields_of_dataclass

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
    # methods add their own optim.* keys (train.methods.Method.optim_fields)


@dataclasses.dataclass
class TrainerConfig:
    max_steps: int = 1000
    accelerator: str = "auto"
    devices: Union[int, str] = 1  # processes per machine
    num_nodes: int = 1  # machines (a multi-node run is launched by SLURM or torchrun; README "Scaling out")
    strategy: str = "auto"  # e.g. ddp (gloo on CPU, NCCL on GPU), fsdp (train.distributed)
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
        _refuse_env(cfg, "")
        plain = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config: {e}") from None
    if "name" not in plain:
        plain["name"] = Path(path).stem if path is not None else "model"
    return validate(plain)


def _refuse_env(value: Any, path: str) -> None:
    """No ``${oc.env:...}`` anywhere: its value would be saved with the run (see the module docstring)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _refuse_env(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _refuse_env(v, f"{path}[{i}]")
    elif isinstance(value, str) and re.search(r"\$\{\s*oc\.env\s*:", value):
        raise ConfigError(
            f"{path}: {value!r}: ${{oc.env:...}} is refused, since the resolved config is saved in config.yaml and "
            "in every checkpoint; pass the value as a command-line override instead"
        )


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
    cfg["seed"] = check_value(cfg.get("seed", 0), int, "seed")
    if not 0 <= cfg["seed"] < 2**32:
        raise ConfigError(f"seed: must be an integer in [0, 2**32), got {cfg['seed']}")
    if "name" in cfg:
        _check_name(cfg["name"])
    cfg["model"] = _check_model(cfg["model"])
    _check_data(cfg)
    _check_optim(cfg["optim"])
    _check_trainer(cfg["trainer"])
    if cfg["trainer"]["strategy"] == "fsdp" and task_of(cfg) != "lm":
        raise ConfigError("trainer.strategy: 'fsdp' is implemented for language models; use ddp for classifiers")
    for method in load_methods().values():
        method.validate(cfg)
    return cfg


def _check_name(name: Any) -> None:
    """``name`` is the folder of the config's runs under ``trainer.out_dir``: one plain folder name."""
    check_value(name, str, "name")
    if name in ("", ".", "..") or any(c in name for c in "/\\\0") or name.startswith("~"):
        raise ConfigError(
            f"name: {name!r} must be a plain folder name (no '/', '\\', '..' or '~'): it names the folder of the "
            "config's runs under trainer.out_dir"
        )


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
    elif data["augment"]:
        raise ConfigError("data.augment: only image classification models take augmentation")
    for key in ("batch_size", "seq_len", "val_batches"):  # seq_len / val_batches: None = the default
        if data[key] is not None and data[key] < 1:
            raise ConfigError(f"data.{key}: must be >= 1, got {data[key]}")
    if data["num_workers"] < 0:
        raise ConfigError(f"data.num_workers: must be >= 0, got {data['num_workers']}")
    if task == "lm" and data["seq_len"] is None:
        data["seq_len"] = cfg["model"]["max_seq_len"]
    if task == "lm" and data["seq_len"] > cfg["model"]["max_seq_len"]:
        raise ConfigError(f"data.seq_len: {data['seq_len']} exceeds model.max_seq_len={cfg['model']['max_seq_len']}")


def _check_optim(optim: dict) -> None:
    def bad(key: str, allowed: str) -> ConfigError:
        return ConfigError(f"optim.{key}: {optim[key]!r} is not allowed; allowed values: {allowed}")

    if not (math.isfinite(optim["lr"]) and optim["lr"] > 0):
        raise bad("lr", "a finite number > 0")
    for key in ("min_lr", "weight_decay", "grad_clip"):
        if not (math.isfinite(optim[key]) and optim[key] >= 0):
            raise bad(key, "a finite number >= 0")
    if not (math.isfinite(optim["eps"]) and optim["eps"] > 0):
        raise bad("eps", "a finite number > 0")
    if optim["warmup_steps"] < 0:
        raise bad("warmup_steps", "an integer >= 0")
    if len(optim["betas"]) != 2 or not all(0 <= b < 1 for b in optim["betas"]):
        raise bad("betas", "two numbers in [0, 1), e.g. [0.9, 0.95]")


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# Lightning's common strategies; any other name is looked up in Lightning's registry (a slower import)
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "fsdp", "deepspeed", "single_device")


def _check_trainer(trainer: dict) -> None:
    for key in ("max_steps", "log_every", "val_every", "ckpt_every", "accumulate_grad_batches", "num_nodes"):
        if trainer[key] < 1:
            raise ConfigError(f"trainer.{key}: must be >= 1, got {trainer[key]}")
    if trainer["keep_checkpoints"] == 0 or trainer["keep_checkpoints"] < -1:
        raise ConfigError("trainer.keep_checkpoints: must be >= 1, or -1 to keep every checkpoint")
    if trainer["accelerator"] not in ACCELERATORS:
        raise ConfigError(
            f"trainer.accelerator: {trainer['accelerator']!r} is not allowed; allowed values: {', '.join(ACCELERATORS)}"
        )
    _check_accelerator_present(trainer["accelerator"])
    if trainer["strategy"] not in STRATEGIES:
        from lightning.pytorch.strategies import StrategyRegistry

        if trainer["strategy"] not in StrategyRegistry:
            raise ConfigError(
                f"trainer.strategy: {trainer['strategy']!r} is not allowed; allowed values: "
                f"{', '.join(dict.fromkeys([*STRATEGIES, *StrategyRegistry]))}"
            )
    devices = trainer["devices"]
    count = int(devices) if isinstance(devices, str) and re.fullmatch(r"-?\d+", devices.strip()) else devices
    ok = (
        count == -1 or count >= 1 if isinstance(count, int) else count == "auto" or re.fullmatch(r"\d+(,\d+)*,?", count)
    )
    if not ok:
        raise ConfigError(
            f"trainer.devices: {devices!r} is not allowed; allowed values: a number of devices >= 1, -1 (all), "
            "'auto', or a list of device indices such as '0,1'"
        )


def _check_accelerator_present(accelerator: str) -> None:
    import torch

    present = {"gpu": torch.cuda.is_available, "cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if accelerator in present and not present[accelerator]():
        raise ConfigError(f"trainer.accelerator: {accelerator!r}, but this machine has no such device; use auto or cpu")


def task_of(cfg: Mapping) -> str:
    """``"lm"`` or ``"classification"``: what the config's model kind is trained for."""
    from arch import MODELS

    return getattr(MODELS.get(cfg["model"].get("kind", "lm"), "model.kind"), "task", "lm")
