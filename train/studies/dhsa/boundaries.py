"""DHSA: train the learned chunk-boundary predictors on a model's keys, labeled by its own attention.

    python -m train dhsa-boundaries <checkpoint | run dir | model dir> [--batches 32] [--steps 300] [--out FILE]

(Xiong et al., "Long-Context Modeling with Dynamic Hierarchical Sparse Attention for On-Device LLMs",
arXiv 2510.24606, Sec. 3.1; labels and loss as in the authors' code).

For every layer whose mixer is a ``CausalSelfAttention`` (dense, or DHSA: same projections), the post-RoPE
queries and keys of windows of the train split (and, for evaluation, of the held-out split) are recorded while the
frozen LM runs; the LM gets no gradient.

Labels come from the model's own attention. With A [T, T] the head-averaged dense causal attention of the layer
(softmax(q kᵀ / √hd), causal; GQA key heads repeated) and w = ``window``, a candidate position p has

    before(p) = Σ_{i >= p+w} Σ_{j in [p-w, p)} A[i, j]      after(p) = Σ_{i >= p+w} Σ_{j in [p, p+w)} A[i, j]

(the attention mass that the later queries give the w keys before p, and the w keys from p on), and label 1 (a
chunk starts at p) iff max(before / after, after / before) >= ``ratio``. Positions with p < w or p + 2w > T have
no full window on each side and are not labeled.

One ``arch.dhsa.BoundaryPredictor`` per layer reads that layer's keys (all kv heads concatenated) and gives a
logit per position; it is trained with the focal loss (RetinaNet: Lin et al. 2017) over the labeled positions,
AdamW, all layers in one loop (disjoint parameters: the same as one run per layer). Evaluation on the held-out
windows: precision / recall / F1 of ``logit > threshold`` (DHSA's default 1.1), the positive rates, and the mean
chunk length DHSA would make from these logits after its non-maximum suppression (``arch.dhsa.nms_starts``).

Writes ``boundaries.safetensors`` (tensors ``layers.<i>.<name>``, metadata dim, n_heads, window, hidden, ratio,
source: what ``arch.dhsa.load_predictor`` reads) and ``boundaries.json`` (arguments and per-layer metrics).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from arch.attention import CausalSelfAttention, causal_attention_probs
from arch.dhsa import DHSA, LEARNED_THRESHOLD, BoundaryPredictor, nms_starts
from arch.io import atomic_write
from arch.registry import ConfigError
from train.checkpoint import load_trained, run_dir_of
from train.cli import add_target
from train.data import TrainWindows, ValWindows
from train.datamodules import LMDataModule
from train.runs import device_for

IGNORE = -1  # label of positions without a full window on each side
_DHSA_DEFAULTS = {
    k: p.default
    for k, p in inspect.signature(DHSA.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty
}


# ---- labels -----------------------------------------------------------------------------------------------------
def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Head-averaged dense causal attention probabilities, float64: q [B, T, H, hd], k [B, T, Hkv, hd] ->
    A [B, T, T] with A[b, i, j] = mean over heads of softmax_j(q_i · k_j / √hd), j <= i (0 above the diagonal)."""
    return causal_attention_probs(q.double(), k.double()).mean(1)


def boundary_labels(A: torch.Tensor, window: int, ratio: float, eps: float = 1e-12) -> torch.Tensor:
    """Boundary labels from attention probabilities A [B, T, T] (row = query) -> int8 [B, T]: 1 where the later
    queries (i >= p + w) split their mass on the w keys before p and the w keys from p on by a factor >= ``ratio``
    (either way), 0 where they do not, ``IGNORE`` (-1) where p < w or p + 2w > T."""
    B, T, _ = A.shape
    w = window
    out = torch.full((B, T), IGNORE, dtype=torch.int8, device=A.device)
    p = torch.arange(w, T - 2 * w + 1, device=A.device)  # labeled candidates
    if len(p) == 0:
        return out
    R = A.double().flip(1).cumsum(1).flip(1)  # R[:, r, j] = Σ_{i >= r} A[:, i, j]
    C = F.pad(R[:, p + w].cumsum(-1), (1, 0))  # [B, nP, T+1]: C[:, n, j] = Σ_{j' < j} R[:, p_n + w, j']
    n = torch.arange(len(p), device=A.device)
    before = C[:, n, p] - C[:, n, p - w]  # [B, nP]
    after = C[:, n, p + w] - C[:, n, p]
    hi, lo = torch.maximum(before, after) + eps, torch.minimum(before, after) + eps
    out[:, p] = (hi / lo >= ratio).to(torch.int8)
    return out


def labels_from_qk(
    q: torch.Tensor, k: torch.Tensor, window: int, ratio: float, max_elements: int = 1 << 24
) -> torch.Tensor:
    """``boundary_labels(attention_probs(q, k))`` a few sequences at a time (bounded [g, H, T, T] float64
    temporaries): q [B, T, H, hd], k [B, T, Hkv, hd] -> int8 [B, T]."""
    B, T, H, _ = q.shape
    g = max(1, max_elements // (H * T * T))
    return torch.cat(
        [boundary_labels(attention_probs(q[i : i + g], k[i : i + g]), window, ratio) for i in range(0, B, g)]
    )


# ---- loss -------------------------------------------------------------------------------------------------------
def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: Optional[float] = 0.25
) -> torch.Tensor:
    """Binary focal loss (RetinaNet: Lin et al. 2017), mean over elements: −α_t (1 − p_t)^γ log p_t, with p_t the
    predicted probability of the true class and α_t = α for positives, 1 − α for negatives (``alpha`` None: no
    weighting). γ = 0 and α None is binary cross-entropy."""
    t = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")  # −log p_t
    p = torch.sigmoid(logits)
    loss = ce * (1 - (p * t + (1 - p) * (1 - t))) ** gamma
    if alpha is not None:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss.mean()


# ---- keys and labels of the frozen LM ---------------------------------------------------------------------------
def attention_layers(model) -> dict[int, CausalSelfAttention]:
    """{layer index: mixer} of the layers whose mixer computes q, k, v like ``CausalSelfAttention``."""
    return {i: b.mixer for i, b in enumerate(model.blocks) if isinstance(b.mixer, CausalSelfAttention)}


@contextlib.contextmanager
def recording_qk(mixers: dict[int, CausalSelfAttention]):
    """While active, a forward hook on every mixer's ``qkv_tap`` stores its rotated (q, k) under the layer index
    in the yielded dict; the model runs unchanged."""
    record: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(i: int):
        def store(module, inputs, output) -> None:
            record[i] = inputs[:2]

        return store

    handles = [m.qkv_tap.register_forward_hook(hook(i)) for i, m in mixers.items()]
    try:
        yield record
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect(
    model,
    mixers: dict[int, CausalSelfAttention],
    windows,
    window: int,
    ratio: float,
    desc: str = "keys",
    progress: bool = True,
) -> tuple[dict[int, list], dict[int, list]]:
    """Run the frozen LM on each window batch ([B, T+1]; the first T tokens) and keep, per layer, the keys
    k.flatten(2) [B, T, Hkv·hd] (float32, CPU) and their labels int8 [B, T]: one list entry per batch."""
    device = next(model.parameters()).device
    keys = {i: [] for i in mixers}
    labels = {i: [] for i in mixers}
    with recording_qk(mixers) as record:
        for w in tqdm(windows, desc=desc, disable=not progress, leave=False):
            model(w[:, :-1].to(device))
            for i, (q, k) in record.items():
                keys[i].append(k.flatten(2).float().cpu())
                labels[i].append(labels_from_qk(q, k, window, ratio).cpu())
            record.clear()
    return keys, labels


# ---- training and evaluation ------------------------------------------------------------------------------------
def train_predictors(
    keys: dict[int, list],
    labels: dict[int, list],
    *,
    n_heads: int,
    window: int = 4,
    hidden: int = 256,
    steps: int = 300,
    lr: float = 1e-3,
    seed: int = 0,
    gamma: float = 2.0,
    alpha: Optional[float] = 0.25,
    device="cpu",
    progress: bool = True,
) -> tuple[dict[int, BoundaryPredictor], torch.Tensor]:
    """One ``BoundaryPredictor`` per layer, trained with the focal loss on the labeled positions; each step takes
    one stored batch (every batch once per epoch, in an order drawn from ``seed``) for every layer.
    Returns ({layer: predictor (eval mode)}, per-step losses [steps, n_layers])."""
    layers = sorted(keys)
    dim = keys[layers[0]][0].shape[-1]
    torch.manual_seed(seed)
    preds = {i: BoundaryPredictor(dim, n_heads, window, hidden).to(device) for i in layers}
    opt = torch.optim.AdamW([p for m in preds.values() for p in m.parameters()], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    bar = tqdm(range(steps), desc="train", disable=not progress, leave=False)
    for step in bar:
        if not order:
            order = torch.randperm(len(keys[layers[0]]), generator=gen).tolist()
        b = order.pop()
        per_layer = []
        for i in layers:
            y = labels[i][b].to(device)  # [B, T]
            logits = preds[i](keys[i][b].to(device))  # [B, T]
            per_layer.append(focal_loss(logits[y != IGNORE], y[y != IGNORE], gamma, alpha))
        loss = torch.stack(per_layer)  # [n_layers]
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        losses.append(loss.detach())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.mean().item():.4f}")
    for m in preds.values():
        m.eval()
    return preds, torch.stack(losses).cpu()


@torch.no_grad()
def evaluate_predictor(
    pred: BoundaryPredictor,
    keys: list,
    labels: list,
    *,
    threshold: float = LEARNED_THRESHOLD,
    nms_radius: int = 8,
    max_chunk: int = 64,
    gamma: float = 2.0,
    alpha: Optional[float] = 0.25,
) -> dict:
    """Metrics of one layer's predictor on stored batches: over the labeled positions, the positive rate of the
    labels and of ``logit > threshold``, precision, recall, F1 (0 when undefined; counts included) and the focal
    loss; over all positions, the mean chunk length after DHSA's non-maximum suppression (``nms_starts``)."""
    device = next(pred.parameters()).device
    tp = fp = fn = pos = n = starts = tokens = 0
    loss = 0.0
    for k, y in zip(keys, labels):
        s = pred(k.to(device)).float().cpu()  # [B, T]
        m = y != IGNORE
        hit, truth = (s > threshold)[m], (y == 1)[m]
        tp, fp, fn = tp + int((hit & truth).sum()), fp + int((hit & ~truth).sum()), fn + int((~hit & truth).sum())
        pos, n = pos + int(truth.sum()), n + int(m.sum())
        loss += focal_loss(s[m], y[m], gamma, alpha).item() * int(m.sum())
        starts += int(nms_starts(s, threshold, nms_radius, max_chunk).sum())
        tokens += s.numel()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "positions": n,
        "pos_rate": pos / n,
        "pred_rate": (tp + fp) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "focal_loss": loss / n,
        "mean_chunk_len": tokens / starts,
    }


def save_predictors(path: str | Path, preds: dict[int, BoundaryPredictor], ratio: float, source: str) -> Path:
    """Write ``layers.<i>.<name>`` tensors and the metadata ``arch.dhsa.load_predictor`` checks (atomically)."""
    from safetensors.torch import save_file

    first = next(iter(preds.values()))
    tensors = {
        f"layers.{i}.{name}": t.detach().cpu().contiguous().clone()
        for i, m in preds.items()
        for name, t in m.state_dict().items()
    }
    meta = {
        "dim": first.dim,
        "n_heads": first.n_heads,
        "window": first.window,
        "hidden": first.hidden,
        "ratio": ratio,
        "source": source,
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={k: str(v) for k, v in meta.items()}))
    return Path(path)


def mixer_switch(path: Path, window: int, hidden: int, threshold: float, nms_radius: int, max_chunk: int) -> str:
    """The config overrides that make every mixer a learned-chunker DHSA reading ``path`` (non-defaults only)."""
    parts = ["model.mixer.type=dhsa", "model.mixer.chunker=learned", f"model.mixer.predictor={path}"]
    for key, value, default in (
        ("window", window, _DHSA_DEFAULTS["window"]),
        ("predictor_hidden", hidden, _DHSA_DEFAULTS["predictor_hidden"]),
        ("threshold", threshold, LEARNED_THRESHOLD),
        ("nms_radius", nms_radius, _DHSA_DEFAULTS["nms_radius"]),
        ("max_chunk", max_chunk, _DHSA_DEFAULTS["max_chunk"]),
    ):
        if value != default:
            parts.append(f"model.mixer.{key}={value}")
    return " ".join(parts)


# ---- the command ------------------------------------------------------------------------------------------------
def _check_args(**kw) -> None:
    rules = {
        "batches": (1, "an integer >= 1"),
        "val_batches": (1, "an integer >= 1"),
        "steps": (1, "an integer >= 1"),
        "window": (1, "an integer >= 1"),
        "hidden": (1, "an integer >= 1"),
        "nms_radius": (0, "an integer >= 0"),
        "max_chunk": (1, "an integer >= 1"),
        "ratio": (1.0, "a number >= 1 (a mass ratio)"),
        "gamma": (0.0, "a number >= 0"),
    }
    for name, (least, allowed) in rules.items():
        if kw[name] < least:
            raise ConfigError(f"--{name.replace('_', '-')}: {kw[name]} is not allowed; allowed values: {allowed}")
    if not kw["lr"] > 0:
        raise ConfigError(f"--lr: {kw['lr']} is not allowed; allowed values: a number > 0")
    if kw["alpha"] is not None and not 0 <= kw["alpha"] <= 1:
        raise ConfigError(f"--alpha: {kw['alpha']} is not allowed; allowed values: a number in [0, 1], or none")


def default_out(target: str | Path) -> Path:
    """``<run dir>/dhsa/boundaries.safetensors``: a directory target is its own run dir; a checkpoint file's run
    dir is the folder above ``checkpoints/``."""
    return run_dir_of(target) / "dhsa" / "boundaries.safetensors"


def frozen_attention_layers(target: str, overrides, window: int, device):
    """(config, frozen model, {layer: attention mixer}) of the model whose keys are labeled; checks that the
    windows leave labeled candidates."""
    cfg, model = load_trained(target, overrides, map_location=device)
    model.requires_grad_(False)
    mixers = attention_layers(model)
    if not mixers:
        kinds = sorted({type(b.mixer).__name__ for b in model.blocks})
        raise ConfigError(
            f"model.mixer: no layer has an attention mixer (CausalSelfAttention: dense, dhsa, ...); "
            f"this model's mixers: {', '.join(kinds)}"
        )
    T = cfg["data"]["seq_len"]
    if T < 3 * window:
        raise ConfigError(
            f"data.seq_len: {T} positions leave no labeled candidate; the labels need >= 3·window = "
            f"{3 * window} (p >= window and p + 2·window <= seq_len)"
        )
    return cfg, model, mixers


def layer_rows(preds, losses, tr_labels, va_keys, va_labels, a: dict) -> list[dict]:
    """Per layer: the train positive rate, first and last training loss, and the held-out metrics."""
    rows = []
    for col, i in enumerate(sorted(preds)):
        lab = torch.cat([y.flatten() for y in tr_labels[i]])
        lab = lab[lab != IGNORE]
        metrics = evaluate_predictor(
            preds[i],
            va_keys[i],
            va_labels[i],
            threshold=a["threshold"],
            nms_radius=a["nms_radius"],
            max_chunk=a["max_chunk"],
            gamma=a["gamma"],
            alpha=a["alpha"],
        )
        rows.append(
            {
                "layer": i,
                "train_pos_rate": (lab == 1).double().mean().item(),
                "train_loss_first": losses[0, col].item(),
                "train_loss_last": losses[-1, col].item(),
                **{f"val_{k}": v for k, v in metrics.items()},
            }
        )
    return rows


def print_rows(rows: list[dict], n_val: int, T: int, window: int, threshold: float) -> None:
    print(
        f"\nboundary predictors on {n_val} held-out windows of {T} tokens (labeled positions "
        f"p in [{window}, {T - 2 * window}]; 'pred' = logit > {threshold}; chunk length after NMS)\n"
    )
    print(
        "| layer | train pos | val pos | val pred | precision | recall |   F1  | focal loss (train first -> last, "
        "val) | mean chunk |\n|---:|---:|---:|---:|---:|---:|---:|---|---:|"
    )
    for r in rows:
        print(
            f"| {r['layer']} | {r['train_pos_rate']:.3f} | {r['val_pos_rate']:.3f} | {r['val_pred_rate']:.3f} | "
            f"{r['val_precision']:.3f} | {r['val_recall']:.3f} | {r['val_f1']:.3f} | "
            f"{r['train_loss_first']:.4f} -> {r['train_loss_last']:.4f}, {r['val_focal_loss']:.4f} | "
            f"{r['val_mean_chunk_len']:.1f} |"
        )


def describe_run(a: dict, skipped: list[int], B: int, T: int, out_path: Path, json_path: Path) -> str:
    return (
        (f"  skipping layers {skipped} (no attention mixer)\n" if skipped else "")
        + f"  labels: head-mean dense causal attention, window {a['window']}, mass ratio >= {a['ratio']}\n"
        f"  train: {a['batches']} batches of {B}x{T} tokens of the train split, {a['steps']} steps of AdamW "
        f"(lr {a['lr']}, seed {a['seed']}), focal loss (gamma {a['gamma']}, alpha {a['alpha']})\n"
        f"  eval: {a['val_batches']} batches of the held-out split at threshold {a['threshold']} "
        f"(NMS radius {a['nms_radius']}, max chunk {a['max_chunk']})\n  writing {out_path} and {json_path}"
    )


def dhsa_boundaries(
    target: str,
    overrides=(),
    *,
    batches: int = 32,
    val_batches: int = 8,
    steps: int = 300,
    lr: float = 1e-3,
    seed: int = 0,
    ratio: float = 2.0,
    gamma: float = 2.0,
    alpha: Optional[float] = 0.25,
    window: int = _DHSA_DEFAULTS["window"],
    hidden: int = _DHSA_DEFAULTS["predictor_hidden"],
    threshold: float = LEARNED_THRESHOLD,
    nms_radius: int = _DHSA_DEFAULTS["nms_radius"],
    max_chunk: int = _DHSA_DEFAULTS["max_chunk"],
    out: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Label, train, evaluate, write; returns {"out", "json", "switch", "layers" (per-layer metrics),
    "predictors" ({layer: BoundaryPredictor}), "losses" [steps, n_layers]}."""
    a = dict(batches=batches, val_batches=val_batches, steps=steps, lr=lr, seed=seed, ratio=ratio, gamma=gamma)
    a.update(alpha=alpha, window=window, hidden=hidden, threshold=threshold, nms_radius=nms_radius)
    a.update(max_chunk=max_chunk)
    _check_args(**a)
    device = device_for()
    cfg, model, mixers = frozen_attention_layers(target, overrides, window, device)
    first = next(iter(mixers.values()))
    n_kv, hd, T, B = first.n_kv_heads, first.head_dim, cfg["data"]["seq_len"], cfg["data"]["batch_size"]
    out_path = Path(out) if out else default_out(target)
    json_path = out_path.with_suffix(".json")
    skipped = [i for i in range(len(model.blocks)) if i not in mixers]
    kind = f"{type(first).__name__}, {n_kv} kv heads x {hd} dims"
    print(f"dhsa-boundaries {target} on {device}: layers {sorted(mixers)} ({kind})")
    print(describe_run(a, skipped, B, T, out_path, json_path), flush=True)
    data = LMDataModule(cfg)
    data.setup()
    train_ds = TrainWindows(data.splits["train"]["tokens"], T, B, seed, 0, batches)
    val_ds = ValWindows(data.splits["validation"]["tokens"], T, val_batches * B)
    mib = (batches + val_batches) * B * T * n_kv * hd * 4 * len(mixers) / 2**20
    print(f"  keys kept in memory: {mib:.1f} MiB (float32, {len(mixers)} layers)", flush=True)
    train_windows = [train_ds[i] for i in range(len(train_ds))]
    tr_keys, tr_labels = collect(model, mixers, train_windows, window, ratio, "keys (train)", progress)
    val_windows = DataLoader(val_ds, batch_size=B, shuffle=False)
    va_keys, va_labels = collect(model, mixers, val_windows, window, ratio, "keys (val)", progress)
    del model
    train_args = {k: a[k] for k in ("window", "hidden", "steps", "lr", "seed", "gamma", "alpha")}
    preds, losses = train_predictors(tr_keys, tr_labels, n_heads=n_kv, device=device, progress=progress, **train_args)
    rows = layer_rows(preds, losses, tr_labels, va_keys, va_labels, a)
    save_predictors(out_path, preds, ratio, str(Path(target).resolve()))
    switch = mixer_switch(out_path, window, hidden, threshold, nms_radius, max_chunk)
    result = {"source": str(target), "overrides": list(overrides), "out": str(out_path), "args": a, "seq_len": T}
    result.update(batch_size=B, train_windows=len(train_ds) * B, val_windows=len(val_ds), switch=switch, layers=rows)
    atomic_write(json_path, lambda p: Path(p).write_text(json.dumps(result, indent=1)))
    print_rows(rows, len(val_ds), T, window, threshold)
    print(f"\nwrote {out_path} ({len(preds)} predictors) and {json_path}")
    print(f"use it: python -m train eval {target} {switch}")
    return {"out": out_path, "json": json_path, "switch": switch, "layers": rows, "predictors": preds, "losses": losses}


def _alpha(text: str) -> float | None:
    """--alpha: a number, or 'none' for no class weighting."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in [0, 1] or 'none'") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target(p, "checkpoint file, run directory, or exported model directory (dense or DHSA mixers)")
    p.add_argument("--batches", type=int, default=32, help="train-split batches (data.batch_size x data.seq_len)")
    p.add_argument("--val-batches", type=int, default=8, help="held-out batches for the evaluation")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (one stored batch per step, all layers)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the init, the batch order and the train windows")
    p.add_argument("--ratio", type=float, default=2.0, help="label 1 where the attention mass ratio across p >= this")
    p.add_argument("--gamma", type=float, default=2.0, help="focal loss gamma (0: cross-entropy)")
    p.add_argument("--alpha", type=_alpha, default=0.25, help="focal loss alpha of the positives, or 'none'")
    # default None: the DHSA mixer's own default (arch/dhsa.py), so the predictors fit `model.mixer.type=dhsa`
    p.add_argument("--window", type=int, help="keys on each side of a candidate boundary (mixer.window; default 4)")
    p.add_argument("--hidden", type=int, help="predictor MLP width (mixer.predictor_hidden; default 256)")
    p.add_argument("--threshold", type=float, help="evaluation: boundary where the logit exceeds this (default 1.1)")
    p.add_argument("--nms-radius", type=int, help="evaluation: non-maximum suppression radius (default 8)")
    p.add_argument("--max-chunk", type=int, help="evaluation: maximum chunk length (default 64)")
    p.add_argument("--out", default=None, help="output file (default: <run dir>/dhsa/boundaries.safetensors)")


def run(args: argparse.Namespace) -> None:
    mixer_opts = {k: getattr(args, k) for k in ("window", "hidden", "threshold", "nms_radius", "max_chunk")}
    dhsa_boundaries(
        args.target,
        args.overrides,
        batches=args.batches,
        val_batches=args.val_batches,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        ratio=args.ratio,
        gamma=args.gamma,
        alpha=args.alpha,
        out=args.out,
        **{k: v for k, v in mixer_opts.items() if v is not None},
    )
