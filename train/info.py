"""Resolved config, per-layer block table, parameter count and FLOPs per token of a config.

python -m train info configs/lm/gpt-tiny.yaml [dotted.key=value ...]
"""

from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from arch import build_model

from .cli import add_target
from .config import load_config, task_of
from .methods import load_methods


def forward_flops_per_token(model_cfg: dict, seq_len: int | None = None) -> float:
    """Forward FLOPs per token of a length-``seq_len`` sequence, counted by ``FlopCounterMode`` on the meta
    device (no memory, no compute). Matmuls only; attention is counted as the full T×T product."""
    T = seq_len or model_cfg["max_seq_len"]
    with torch.device("meta"):
        model = build_model(model_cfg)
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, T, dtype=torch.long))
    return counter.get_total_flops() / T


def count_params(model: torch.nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {"total": total, "non_embedding": total - emb}


def _spec(spec: dict) -> str:
    """{'type': 'mlp', 'activation': 'gelu', 'd_ff': None} -> 'mlp activation=gelu'."""
    opts = ",".join(f"{k}={v}" for k, v in spec.items() if k != "type" and v is not None)
    return f"{spec['type']} {opts}".strip()


def image_forward_flops(model_cfg: dict, size: int) -> float:
    """Forward FLOPs (2 per multiply-add) of one ``size``×``size`` image, counted on the meta device."""
    with torch.device("meta"):
        model = build_model(model_cfg)
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, model_cfg["in_chans"], size, size))
    return counter.get_total_flops()


def classifier_info(cfg: dict) -> dict:
    m = cfg["model"]
    with torch.device("meta"):
        model = build_model(m)
    params = count_params(model)
    size = m["image_size"]
    flops = image_forward_flops(m, size)
    paper = model.paper_reference() if hasattr(model, "paper_reference") else None
    print(
        f"parameters: {params['total']:,} ({params['total'] / 1e6:.2f}M)"
        + (f"  | paper ({paper['name']}, 1000 classes): {paper['params_m']}M" if paper else "")
    )
    print(
        f"FLOPs at {size}x{size}: {flops / 2e9:.3f} G multiply-adds ({flops / 1e9:.3f} GFLOP)"
        + (f"  | paper: {paper['gmacs']} G (fvcore counts multiply-adds)" if paper else "")
    )
    return {"params": params, "forward_flops": flops, "paper": paper}


def memory_report(cfg: dict) -> bool:
    """Print the memory estimate of training the config here (``train.runs.estimate_memory``), with a warning
    when it exceeds the memory available (``fit`` refuses such a config); returns whether it fits."""
    from .runs import memory_line

    line, fits = memory_line(cfg, training=True)
    print(f"memory: {line}" if fits else f"warning: too large to train here: {line}")
    return fits


def info(config_path: str, overrides=()) -> dict:
    cfg = load_config(config_path, overrides)
    print(f"# resolved config of {config_path}\n" + OmegaConf.to_yaml(OmegaConf.create(cfg)))
    if task_of(cfg) == "classification":
        out = classifier_info(cfg)
        return {**out, "fits_in_memory": memory_report(cfg)}
    with torch.device("meta"):
        model = build_model(cfg["model"])
    rows = model.layer_table() if hasattr(model, "layer_table") else []
    if rows:
        print(f"{'layer':>5}  {'mixer':<40} {'ffn':<40} proj")
        for r in rows:
            print(f"{r['layer']:>5}  {_spec(r['mixer']):<40} {_spec(r['ffn']):<40} {_spec(r['proj'])}")
    params = count_params(model)
    flops = forward_flops_per_token(cfg["model"], cfg["data"]["seq_len"])
    print(f"parameters: {params['total']:,} ({params['total'] / 1e6:.2f}M), non-embedding {params['non_embedding']:,}")
    print(
        f"FLOPs per token at T={cfg['data']['seq_len']}: forward {flops / 1e6:.2f} MFLOP, "
        f"training (fwd+bwd = 3x fwd) {3 * flops / 1e6:.2f} MFLOP"
    )
    for method in load_methods().values():
        for line in method.describe(model):
            print(f"  {line}")
    return {"params": params, "forward_flops_per_token": flops, "fits_in_memory": memory_report(cfg)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target(p, "config YAML")


def run(args: argparse.Namespace) -> None:
    info(args.target, args.overrides)
