"""Sweep files: a base config, the arms to compare, and one compute budget.

```yaml
base: ../lm/gpt-tiny.yaml            # the config of every arm that names none (paths relative to this file)
overrides: {model.max_seq_len: 512}  # applied to every arm, after its config
budget: {flops: 2.0e+14}             # exactly one of: flops (training FLOPs, measured), tokens, wall_clock (s)
reference: dense                     # the arm the table's ratio column divides by (default: the first arm)
val_points: 8                        # validation points on each run's curve
arms:
  dense: {}
  tokenformer: {config: ../lm/tokenformer-tiny.yaml}
  dhsa: {model.mixer: {type: dhsa, query_block: 32}, model.mixer.budget: [128, 256, 512]}
  bra: [model.mixer.type=bra, "model.mixer.topk=[2,4]"]
```

An arm is a mapping of dotted config keys to values (``config:`` names its config file) or a list of command-line
overrides (``key=value``). A list value expands into one arm per element (``dhsa.budget=128``, ...; several
lists expand into their product), unless the key already holds a list in the arm's config (``optim.betas``):
then it is set as is, and a list of lists sweeps it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from omegaconf import OmegaConf

from arch.registry import ConfigError
from train.config import load_config

BUDGETS = ("flops", "tokens", "wall_clock")
SWEEP_KEYS = ("base", "overrides", "budget", "reference", "val_points", "arms")
RESERVED = ("config",)  # arm keys that are not config overrides


@dataclasses.dataclass
class Arm:
    name: str
    config: str  # the arm's config file
    overrides: list[str]  # the sweep's common overrides, then the arm's own


@dataclasses.dataclass
class Sweep:
    path: Path
    arms: list[Arm]
    budget: tuple[str, float]  # (kind, amount)
    reference: str
    val_points: int = 8

    @property
    def name(self) -> str:
        return self.path.stem


def as_overrides(spec, where: str) -> list[str]:
    """A mapping {dotted.key: value} or a list of "key=value" strings -> dotlist strings."""
    if isinstance(spec, Mapping):
        return [f"{k}={json.dumps(v)}" for k, v in spec.items() if k not in RESERVED]
    if isinstance(spec, list) and all(isinstance(s, str) and "=" in s for s in spec):
        return list(spec)
    raise ConfigError(f"{where}: expected a mapping of dotted keys to values or a list of key=value strings")


def split_override(item: str) -> tuple[str, object]:
    """'a.b=[1,2]' -> ('a.b', [1, 2]) parsed as OmegaConf parses command-line overrides."""
    key = item.split("=", 1)[0].strip()
    value = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
    for part in key.split("."):
        value = value[part]
    return key, value


def lookup(cfg: dict, key: str):
    for part in key.split("."):
        if not isinstance(cfg, Mapping) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def label(value) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def expand(name: str, config: str, overrides: list[str]) -> list[Arm]:
    """The arms that list values in ``overrides`` expand into (see the module docstring)."""
    parsed = [split_override(o) for o in overrides]
    fixed = [o for o, (_, v) in zip(overrides, parsed) if not isinstance(v, list)]
    resolved = load_config(config, fixed) if len(fixed) < len(overrides) else {}
    sweeps = [(k, v) for k, v in parsed if isinstance(v, list) and not isinstance(lookup(resolved, k), list)]
    if not sweeps:
        return [Arm(name, config, overrides)]
    swept = {k for k, _ in sweeps}
    kept = [o for o, (k, _) in zip(overrides, parsed) if k not in swept]
    for key, values in sweeps:
        if not values:
            raise ConfigError(f"arms.{name}.{key}: an empty list expands into no arm")
    arms = []
    for combo in itertools.product(*(values for _, values in sweeps)):
        suffix = ".".join(f"{k.split('.')[-1]}={label(v)}" for (k, _), v in zip(sweeps, combo))
        sets = [f"{k}={json.dumps(v)}" for (k, _), v in zip(sweeps, combo)]
        arms.append(Arm(f"{name}.{suffix}", config, kept + sets))
    return arms


def parse_budget(spec) -> tuple[str, float]:
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in BUDGETS:
        raise ConfigError(f"budget: expected exactly one of {', '.join(BUDGETS)}, e.g. budget: {{tokens: 2.0e+6}}")
    kind, amount = next(iter(spec.items()))
    try:
        amount = float(amount)  # YAML reads 2e14 (no dot) as a string
    except (TypeError, ValueError):
        raise ConfigError(f"budget.{kind}: {amount!r} is not a number") from None
    if amount <= 0:
        raise ConfigError(f"budget.{kind}: must be > 0, got {amount}")
    return kind, amount


def parse_budget_option(text: str) -> tuple[str, float]:
    """``--budget KIND=AMOUNT`` (e.g. ``flops=2e12``) -> (kind, amount)."""
    kind, sep, amount = text.partition("=")
    if not sep:
        raise ConfigError(f"--budget: expected KIND=AMOUNT with KIND one of {', '.join(BUDGETS)}, got {text!r}")
    return parse_budget({kind.strip(): amount.strip()})


def load_sweep(path: str | Path, budget: str | None = None, overrides: Iterable[str] = ()) -> Sweep:
    """Read and check a sweep file; every arm's config is validated (nothing is built or written). ``budget``
    (``KIND=AMOUNT``) replaces the file's budget (a short run of the same arms); ``overrides`` (``key=value``) are
    applied to every arm after the file's ``overrides`` (an arm's own keys still win)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    unknown = [k for k in raw if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{path.name}: {unknown[0]}: unknown key; allowed keys: {', '.join(SWEEP_KEYS)}")
    arms_spec = raw.get("arms")
    if not isinstance(arms_spec, Mapping) or not arms_spec:
        raise ConfigError(f"{path.name}: arms: expected a mapping of arm names to overrides")
    common = as_overrides(raw.get("overrides") or {}, "overrides") + as_overrides(list(overrides), "overrides")
    arms = []
    for name, spec in arms_spec.items():
        spec = spec or {}
        config = spec.get("config", raw.get("base")) if isinstance(spec, Mapping) else raw.get("base")
        if config is None:
            raise ConfigError(f"arms.{name}: no config: give the sweep a base or the arm a config")
        arms += expand(str(name), str(path.parent / config), common + as_overrides(spec, f"arms.{name}"))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"arms: two arms are named {next(n for n in names if names.count(n) > 1)!r}")
    reference = str(raw.get("reference", names[0]))
    if reference not in names:
        raise ConfigError(f"reference: {reference!r} is not an arm; arms: {', '.join(names)}")
    val_points = int(raw.get("val_points", 8))
    if val_points < 1:
        raise ConfigError(f"val_points: must be >= 1, got {val_points}")
    spent = parse_budget_option(budget) if budget is not None else parse_budget(raw.get("budget"))
    return Sweep(path, arms, spent, reference, val_points)


SAME_DATA = ("source", "tokenizer", "batch_size", "seq_len")  # data keys that fix the order of training batches


def check_same_data(configs: dict[str, dict]) -> None:
    """Every arm must train on the same batches: same data source, tokenizer, batch size, context, accumulation
    and seed."""
    (first, ref), *rest = configs.items()
    for name, cfg in rest:
        for key in SAME_DATA:
            if cfg["data"][key] != ref["data"][key]:
                raise ConfigError(
                    f"arms.{name}: data.{key} is {cfg['data'][key]!r} but {ref['data'][key]!r} in arm {first}; "
                    "every arm must train on the same batches (set it in the sweep's overrides)"
                )
        for section, key in (("trainer", "accumulate_grad_batches"), ("trainer", "devices")):
            if cfg[section][key] != ref[section][key]:
                raise ConfigError(f"arms.{name}: {section}.{key} differs from arm {first}'s; it must not")
        if cfg["seed"] != ref["seed"]:
            raise ConfigError(f"arms.{name}: seed {cfg['seed']} differs from arm {first}'s ({ref['seed']})")
