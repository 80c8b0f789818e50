"""``python -m train info``: resolved config, per-layer block table, parameter count, FLOPs per token."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from arch import build_model

from .config import load_config


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


def info(config_path: str, overrides=()) -> dict:
    cfg = load_config(config_path, overrides)
    print(f"# resolved config of {config_path}\n" + OmegaConf.to_yaml(OmegaConf.create(cfg)))
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
    print(f"FLOPs per token at T={cfg['data']['seq_len']}: forward {flops / 1e6:.2f} MFLOP, "
          f"training (fwd+bwd = 3x fwd) {3 * flops / 1e6:.2f} MFLOP")  # fmt: skip
    if any(r["ffn"]["type"] == "duo" for r in rows):
        print("  (duo FFN layers counted with every token routed big: an upper bound)")
    return {"params": params, "forward_flops_per_token": flops}
