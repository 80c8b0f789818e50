"""Resolved config, per-layer block table, parameter count and FLOPs per token of a config.

python -m train info configs/lm/gpt-tiny.yaml [dotted.key=value ...] [--measure N]
python -m train info configs/paper/<model>.yaml --weights <released checkpoint>.pth

Two FLOP counts, both from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention; 2 FLOPs per
multiply-add): the config's upper bound (``forward_flops_per_token``: shapes only, on the meta device, so data-
dependent blocks count their largest case) and, with ``--measure N``, the FLOPs a forward pass actually executes
on N held-out windows (``measured_flops_per_token``: routed FFNs count the routes taken, sparse mixers the blocks
they attend, parameter-token layers their token count), at initialisation here; ``python -m train compare``
measures trained models too. ``--weights``: also check that a released checkpoint of the config's model converts
and loads strictly.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from arch import build_model

from .cli import add_target, add_weights
from .config import load_config, task_of
from .methods import load_methods


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


# FlopCounterMode has formulas for the CUDA attention kernels only; on CPU, SDPA runs these two ops, which it
# would otherwise count as 0. Like the CUDA formulas, they count the whole q·kᵀ and p·v products (a causal or
# masked call is counted in full).
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def flop_counter() -> FlopCounterMode:
    """The repo's one FLOP counter: ``FlopCounterMode`` with the CPU attention formulas."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


def forward_flops_per_token(model_cfg: dict, seq_len: int | None = None) -> float:
    """Forward FLOPs per token of a length-``seq_len`` sequence, counted on the meta device (no memory, no
    compute): the config's upper bound. Matmuls only; attention is counted as the full T×T product, a routed FFN
    as if every token went to its biggest module, a sparse mixer at its largest selection."""
    T = seq_len or model_cfg["max_seq_len"]
    with torch.device("meta"):
        model = build_model(model_cfg)
        with flop_counter() as counter:
            model(torch.zeros(1, T, dtype=torch.long))
    return counter.get_total_flops() / T


def measured_flops_per_token(model: torch.nn.Module, batches: Iterable[torch.Tensor], train: bool = False) -> float:
    """FLOPs per token that ``model`` actually executes on ``batches`` (LongTensors [b, T + 1], real data on a
    real device): what routed FFNs compute for the routes their tokens take, what sparse mixers compute for the
    blocks they select, what parameter-token layers compute for their token count.

    ``train=False``: forward passes in eval mode without gradient (inference). ``train=True``: forward and
    backward of the next-token loss in training mode (what a training step executes, e.g. a soft mixture of
    experts while a routing layer trains); the gradients are discarded. The model's mode is restored."""
    was_training = model.training
    model.train(train)
    tokens = 0
    try:
        with flop_counter() as counter:
            for batch in batches:
                x = batch[:, :-1]  # [b, T]
                with torch.set_grad_enabled(train):
                    logits = model(x)  # [b, T, V]
                    if train:
                        F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()).backward()
                tokens += x.numel()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if tokens == 0:
        raise ValueError("measured_flops_per_token: no batch to measure on")
    return counter.get_total_flops() / tokens


def count_params(model: torch.nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {"total": total, "non_embedding": total - emb}


def _spec(spec: dict) -> str:
    """{'type': 'mlp', 'activation': 'gelu', 'd_ff': None} -> 'mlp activation=gelu'."""
    opts = ",".join(f"{k}={v}" for k, v in spec.items() if k != "type" and v is not None)
    return f"{spec['type']} {opts}".strip()


def image_forward_flops(model_cfg: dict, size: int) -> float:
    """Forward FLOPs (2 per multiply-add) of one ``size``×``size`` image, counted on the meta device in eval mode
    (a training-mode BatchNorm cannot take one image whose last stage is 1×1)."""
    with torch.device("meta"):
        model = build_model(model_cfg).eval()
        with flop_counter() as counter:
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


def heldout_batches(cfg: dict, n_windows: int) -> list[torch.Tensor]:
    """``n_windows`` held-out windows of ``data.seq_len + 1`` tokens spread evenly over the validation split, in
    batches of at most ``data.batch_size`` (LongTensors [b, T + 1])."""
    from .data import ValWindows, build_tokenizer, load_tokens

    d = cfg["data"]
    tokens = load_tokens(d, build_tokenizer(d["tokenizer"]))["validation"]["tokens"]
    windows = ValWindows(tokens, d["seq_len"], n_windows)
    rows = torch.stack([windows[i] for i in range(len(windows))])  # [n, T + 1]
    return list(rows.split(d["batch_size"]))


def print_measured(cfg: dict, upper: float, n_windows: int) -> dict:
    """Measure the config's model at initialisation (seeded by ``seed``) on held-out windows; print and return
    {"forward", "train"} FLOPs per token."""
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg["model"])
    batches = heldout_batches(cfg, n_windows)
    out = {"forward": measured_flops_per_token(model, batches), "train": measured_flops_per_token(model, batches, True)}
    print(
        f"measured on {n_windows} held-out windows (initial weights): forward {out['forward'] / 1e6:.2f} MFLOP/token "
        f"({out['forward'] / upper:.1%} of the upper bound), training step (fwd+bwd) {out['train'] / 1e6:.2f} MFLOP"
    )
    return out


def released_info(cfg: dict, weights: str) -> dict:
    """Load the released checkpoint ``weights`` strictly into the config's model; count what it holds."""
    from .checkpoint import load_released

    model = load_released(cfg, weights)
    state = model.state_dict()
    return {"tensors": len(state), "params": count_params(model)["total"]}


def memory_report(cfg: dict) -> bool:
    """Print the memory estimate of training the config here (``train.runs.estimate_memory``), with a warning
    when it exceeds the memory available (``fit`` refuses such a config); returns whether it fits."""
    from .runs import memory_line

    line, fits = memory_line(cfg, training=True)
    print(f"memory: {line}" if fits else f"warning: too large to train here: {line}")
    return fits


def info(config_path: str, overrides=(), measure: int = 0, weights: str | None = None) -> dict:
    cfg = load_config(config_path, overrides)
    loaded = released_info(cfg, weights) if weights is not None else None
    print(f"# resolved config of {config_path}\n" + OmegaConf.to_yaml(OmegaConf.create(cfg)))
    if loaded is not None:
        print(
            f"weights: {weights} loaded strictly (released checkpoint, converted): {loaded['tensors']} tensors, "
            f"{loaded['params']:,} parameters"
        )
    if task_of(cfg) == "classification":
        out = classifier_info(cfg)
        return {**out, "fits_in_memory": memory_report(cfg), "weights": loaded}
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
        f"FLOPs per token at T={cfg['data']['seq_len']} (config upper bound): forward {flops / 1e6:.2f} MFLOP, "
        f"training (fwd+bwd = 3x fwd) {3 * flops / 1e6:.2f} MFLOP"
    )
    for method in load_methods().values():
        for line in method.describe(model):
            print(f"  {line}")
    out = {"params": params, "forward_flops_per_token": flops, "fits_in_memory": memory_report(cfg)}
    if measure:
        out["measured_flops_per_token"] = print_measured(cfg, flops, measure)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target(p, "config YAML")
    p.add_argument(
        "--measure",
        type=int,
        default=0,
        metavar="N",
        help="also measure the FLOPs executed on N held-out windows (initial weights; language models)",
    )
    add_weights(p)


def run(args: argparse.Namespace) -> None:
    info(args.target, args.overrides, args.measure, args.weights)
