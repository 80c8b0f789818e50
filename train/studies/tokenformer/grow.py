"""TokenFormer growth: append parameter tokens to every Pattention of a trained model (function unchanged).

    python -m train grow <checkpoint | run dir | model dir> --scale 2 [--slots qkv=512,proj=512,ffn=2048] [--out DIR]

New keys are zero and new values random, so the grown model computes the same function (to rounding); continue
training it with ``python -m train fit <config> --init-from <out>`` (``optim.freeze_old_tokens=true`` trains
only the new tokens).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from arch import ConfigError, grow, save_pretrained
from train.checkpoint import load_trained, run_dir_of


def parse_slots(text: str | None) -> dict | None:
    """'qkv=512,proj=512,ffn=2048' -> {'qkv': 512, 'proj': 512, 'ffn': 2048}."""
    if not text:
        return None
    try:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise ConfigError(f"--slots {text!r}: expected role=count pairs, e.g. qkv=512,proj=512,ffn=2048") from None


def grow_command(target: str, scale: float | None, slots: str | None, out: str | None, seed: int = 0) -> Path:
    cfg, model = load_trained(target)
    slot_map = parse_slots(slots)
    grown = grow(model, scale=None if slot_map else scale, slots=slot_map, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg["model"]["vocab_size"], (2, min(64, cfg["model"]["max_seq_len"])), generator=g)
    with torch.no_grad():
        diff = (grown(x) - model(x)).abs().max().item()
    tag = f"x{scale:g}" if slot_map is None else "slots-" + "-".join(f"{k}{v}" for k, v in slot_map.items())
    out_dir = Path(out) if out else run_dir_of(target) / f"grown-{tag}"
    save_pretrained(grown, out_dir)
    n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (model, grown))
    print(
        f"grew {target}: {n0 / 1e6:.2f}M -> {n1 / 1e6:.2f}M parameters ({tag}); "
        f"max |logit change| on a random batch: {diff:.2e}"
    )
    print(
        f"wrote {out_dir} (model.safetensors + config.yaml); continue with:\n"
        f"  python -m train fit <config.yaml> --init-from {out_dir}"
    )
    return out_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="checkpoint file, run directory, or exported model directory")
    p.add_argument("--scale", type=float, default=2.0, help="multiply every token count by this (>= 1)")
    p.add_argument("--slots", help="explicit new counts per role instead of --scale, e.g. qkv=512,proj=512,ffn=2048")
    p.add_argument("--out", help="output directory (default: <run dir>/grown-x<scale>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new value tokens")


def run(args: argparse.Namespace) -> None:
    grow_command(args.target, args.scale, args.slots, args.out, args.seed)
