"""DHSA: train the learned chunk-boundary predictors on a model's keys, labeled by its own attention.

    python -m train dhsa-boundaries <checkpoint | run dir | model dir> [--setting ours|authors] [--batches 32]
        [--steps 300] [--out FILE]

(Xiong et al., "Long-Context Modeling with Dynamic Hierarchical Sparse Attention for On-Device LLMs",
arXiv 2510.24606, Sec. 3.1.) ``--setting authors`` labels, weighs and shares the predictors as the authors'
released code does (legacy/boundary_predictor ``train.py`` and ``loss.py``; the labels in legacy/utils/helper.py
``_compute_cumulative_attention_mass_ratio``); ``--setting ours`` (the default) is our variant. They differ only in
the fields of ``Setting``, ours / the authors':

* label rows of a candidate p (a chunk starts at p): queries i >= p + w / i >= p + w − 1 (their candidate is the
  gap c = p − 1 and their rows are i >= c + w);
* labeled candidates: p in [w, T − 2w] / p in [2w, T − 2w] (their mask [2w − 1, T − 2w) on c);
* the ratio's ε: 1e-12 / 1e-6;
* the loss: focal with γ 2 and α 0.25 / focal with γ 2, no α and the BCE's pos_weight 1.3;
* the predictors: one per layer, LayerNorm(x + attn(x)) / one shared by all layers, LayerNorm(attn(x));
* the optimizer: AdamW with weight decay 0.01 / Adam (no weight decay);
* the printed switch: each layer chunks its own keys with its own predictor / adds ``shared_predictor=true
  predictor_residual=false share_boundaries=true`` (the authors chunk layer 0's keys once for all layers).

In neither setting are the learning rate and the step count the authors' (``--lr`` 1e-3 and ``--steps``; theirs:
1e-4 for 2 epochs over ~60k long documents), nor the data (windows of this model's train split), nor Gemma-2's
sliding-window layers (whose label rows the authors stop 4096 positions after the candidate).

For every layer whose mixer is a ``CausalSelfAttention`` (dense, or DHSA: same projections), the post-RoPE
queries and keys of windows of the train split (and, for evaluation, of the held-out split) are recorded while the
frozen LM runs; the LM gets no gradient.

Labels come from the model's own attention. With A [T, T] the head-averaged dense causal attention of the layer
(softmax(q kᵀ / √hd), causal; GQA key heads repeated), w = ``window`` and the setting's label rows i >= r(p),
a candidate position p has

    before(p) = Σ_{i >= r(p)} Σ_{j in [p-w, p)} A[i, j]      after(p) = Σ_{i >= r(p)} Σ_{j in [p, p+w)} A[i, j]

(the attention mass that the later queries give the w keys before p, and the w keys from p on), and label 1 (a
chunk starts at p) iff (max(before, after) + ε) / (min(before, after) + ε) >= ``ratio`` (the authors: 2, through a
sigmoid soft label thresholded at 0.5, which is the same rule). Candidates outside the labeled range are ignored.

The predictors (``arch.dhsa.BoundaryPredictor``) read a layer's keys (all kv heads concatenated) and give a logit
per position. They are trained with the focal loss (RetinaNet: Lin et al. 2017) over the labeled positions, all
layers in one loop: per-layer predictors get disjoint gradients (the same as one run per layer), the shared one
the sum over layers (as in the authors' loop: one backward per layer, then one step). Evaluation on the held-out
windows, per layer: precision / recall / F1 of ``logit > threshold`` (DHSA's default 1.1), the positive rates, and
the mean chunk length DHSA would make from these logits after its non-maximum suppression (``arch.dhsa.nms_starts``).

Writes ``boundaries.safetensors`` (tensors ``layers.<i>.<name>``, or ``shared.<name>`` for the shared predictor;
metadata dim, n_heads, window, hidden, residual, ratio, setting, source: what ``arch.dhsa.load_predictor`` reads)
and ``boundaries.json`` (arguments and per-layer metrics).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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

IGNORE = -1  # label of positions outside the labeled range
_DHSA_DEFAULTS = {
    k: p.default
    for k, p in inspect.signature(DHSA.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty
}


# ---- settings ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Setting:
    """How the predictors are labeled, trained, shared and switched on (``--setting``; the module docstring)."""

    name: str
    row_shift: int  # label rows of candidate p: queries i >= p + window + row_shift
    first: int  # labeled candidates: p in [first * window, T - 2 * window]
    eps: float  # ratio = (max(before, after) + eps) / (min(before, after) + eps)
    gamma: float  # focal loss
    alpha: Optional[float]
    pos_weight: float
    shared: bool  # one predictor for all layers
    residual: bool  # LayerNorm(x + attn(x)), else LayerNorm(attn(x))
    weight_decay: float  # AdamW's; 0 = Adam
    share_boundaries: bool  # the switch chunks once, with the first DHSA layer's keys


SETTINGS = {
    "ours": Setting("ours", 0, 1, 1e-12, 2.0, 0.25, 1.0, False, True, 0.01, False),
    "authors": Setting("authors", -1, 2, 1e-6, 2.0, None, 1.3, True, False, 0.0, True),
}


# ---- labels -----------------------------------------------------------------------------------------------------
def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Head-averaged dense causal attention probabilities, float64: q [B, T, H, hd], k [B, T, Hkv, hd] ->
    A [B, T, T] with A[b, i, j] = mean over heads of softmax_j(q_i · k_j / √hd), j <= i (0 above the diagonal)."""
    return causal_attention_probs(q.double(), k.double()).mean(1)


def boundary_labels(A: torch.Tensor, window: int, ratio: float, setting: Setting = SETTINGS["ours"]) -> torch.Tensor:
    """Boundary labels from attention probabilities A [B, T, T] (row = query) -> int8 [B, T]: 1 where the later
    queries (the setting's label rows, i >= p + w + row_shift) split their mass on the w keys before p and the w
    keys from p on by a factor >= ``ratio`` (either way), 0 where they do not, ``IGNORE`` (-1) outside the
    setting's labeled range p in [first·w, T − 2w]."""
    B, T, _ = A.shape
    w = window
    out = torch.full((B, T), IGNORE, dtype=torch.int8, device=A.device)
    p = torch.arange(setting.first * w, T - 2 * w + 1, device=A.device)  # labeled candidates
    if len(p) == 0:
        return out
    R = A.double().flip(1).cumsum(1).flip(1)  # R[:, r, j] = Σ_{i >= r} A[:, i, j]
    rows = p + w + setting.row_shift  # the first label row of each candidate
    C = F.pad(R[:, rows].cumsum(-1), (1, 0))  # [B, nP, T+1]: C[:, n, j] = Σ_{j' < j} R[:, rows_n, j']
    n = torch.arange(len(p), device=A.device)
    before = C[:, n, p] - C[:, n, p - w]  # [B, nP]
    after = C[:, n, p + w] - C[:, n, p]
    hi, lo = torch.maximum(before, after) + setting.eps, torch.minimum(before, after) + setting.eps
    out[:, p] = (hi / lo >= ratio).to(torch.int8)
    return out


def labels_from_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    window: int,
    ratio: float,
    setting: Setting = SETTINGS["ours"],
    max_elements: int = 1 << 24,
) -> torch.Tensor:
    """``boundary_labels(attention_probs(q, k))`` a few sequences at a time (bounded [g, H, T, T] float64
    temporaries): q [B, T, H, hd], k [B, T, Hkv, hd] -> int8 [B, T]."""
    B, T, H, _ = q.shape
    g = max(1, max_elements // (H * T * T))
    return torch.cat(
        [boundary_labels(attention_probs(q[i : i + g], k[i : i + g]), window, ratio, setting) for i in range(0, B, g)]
    )


# ---- loss -------------------------------------------------------------------------------------------------------
def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: float = 2.0,
    alpha: Optional[float] = 0.25,
    pos_weight: float = 1.0,
) -> torch.Tensor:
    """Binary focal loss (RetinaNet: Lin et al. 2017), mean over elements: −α_t (1 − p_t)^γ c_t log p_t, with p_t
    the predicted probability of the true class, α_t = α for positives, 1 − α for negatives (``alpha`` None: no
    weighting) and c_t = ``pos_weight`` for positives, 1 for negatives (the BCE's pos_weight, as the authors'
    ``focal_bce_loss``). γ = 0, α None and pos_weight 1 is binary cross-entropy."""
    t = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, t, pos_weight=logits.new_tensor(pos_weight), reduction="none")
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
    setting: Setting = SETTINGS["ours"],
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
                labels[i].append(labels_from_qk(q, k, window, ratio, setting).cpu())
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
    setting: Setting = SETTINGS["ours"],
    device="cpu",
    progress: bool = True,
) -> tuple[dict[int, BoundaryPredictor], torch.Tensor]:
    """A ``BoundaryPredictor`` per layer, or one for all layers (``setting.shared``), trained with the setting's
    focal loss on the labeled positions; each step takes one stored batch (every batch once per epoch, in an order
    drawn from ``seed``) for every layer and steps once on the sum of the layers' losses.
    Returns ({layer: predictor (eval mode); the same object for every layer when shared}, per-step losses
    [steps, n_layers])."""
    layers = sorted(keys)
    dim = keys[layers[0]][0].shape[-1]
    torch.manual_seed(seed)
    make = lambda: BoundaryPredictor(dim, n_heads, window, hidden, setting.residual).to(device)  # noqa: E731
    if setting.shared:
        preds = dict.fromkeys(layers, make())
    else:
        preds = {i: make() for i in layers}
    params = {id(p): p for m in preds.values() for p in m.parameters()}  # the shared predictor's once
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=setting.weight_decay)
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
            m = y != IGNORE
            per_layer.append(focal_loss(logits[m], y[m], setting.gamma, setting.alpha, setting.pos_weight))
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
    setting: Setting = SETTINGS["ours"],
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
        loss += focal_loss(s[m], y[m], setting.gamma, setting.alpha, setting.pos_weight).item() * int(m.sum())
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


def save_predictors(
    path: str | Path, preds: dict[int, BoundaryPredictor], ratio: float, source: str, setting: Setting
) -> Path:
    """Write ``layers.<i>.<name>`` tensors, or ``shared.<name>`` (``setting.shared``), and the metadata
    ``arch.dhsa.load_predictor`` checks (atomically)."""
    from safetensors.torch import save_file

    first = next(iter(preds.values()))
    owners = {"shared": first} if setting.shared else {f"layers.{i}": m for i, m in preds.items()}
    tensors = {
        f"{owner}.{name}": t.detach().cpu().contiguous().clone()
        for owner, m in owners.items()
        for name, t in m.state_dict().items()
    }
    meta = {
        "dim": first.dim,
        "n_heads": first.n_heads,
        "window": first.window,
        "hidden": first.hidden,
        "residual": int(first.residual),
        "ratio": ratio,
        "setting": setting.name,
        "source": source,
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={k: str(v) for k, v in meta.items()}))
    return Path(path)


def mixer_switch(
    path: Path, window: int, hidden: int, threshold: float, nms_radius: int, max_chunk: int, setting: Setting
) -> str:
    """The config overrides that make every mixer a learned-chunker DHSA reading ``path`` as ``setting`` uses its
    predictors (non-defaults only)."""
    parts = ["model.mixer.type=dhsa", "model.mixer.chunker=learned", f"model.mixer.predictor={path}"]
    for key, value, default in (
        ("window", window, _DHSA_DEFAULTS["window"]),
        ("predictor_hidden", hidden, _DHSA_DEFAULTS["predictor_hidden"]),
        ("threshold", threshold, LEARNED_THRESHOLD),
        ("nms_radius", nms_radius, _DHSA_DEFAULTS["nms_radius"]),
        ("max_chunk", max_chunk, _DHSA_DEFAULTS["max_chunk"]),
        ("predictor_residual", setting.residual, _DHSA_DEFAULTS["predictor_residual"]),
        ("shared_predictor", setting.shared, _DHSA_DEFAULTS["shared_predictor"]),
        ("share_boundaries", setting.share_boundaries, _DHSA_DEFAULTS["share_boundaries"]),
    ):
        if value != default:
            parts.append(f"model.mixer.{key}={str(value).lower() if isinstance(value, bool) else value}")
    return " ".join(parts)


# ---- the command ------------------------------------------------------------------------------------------------
FROM_SETTING = object()  # an option left to the setting


def resolve_setting(
    name: str,
    gamma: float | object = FROM_SETTING,
    alpha: float | None | object = FROM_SETTING,
    pos_weight: float | object = FROM_SETTING,
) -> Setting:
    """``SETTINGS[name]`` with the loss options that are given (not ``FROM_SETTING``) replaced."""
    if name not in SETTINGS:
        raise ConfigError(f"--setting: {name!r} is not allowed; allowed values: {', '.join(SETTINGS)}")
    given = {k: v for k, v in (("gamma", gamma), ("alpha", alpha), ("pos_weight", pos_weight)) if v is not FROM_SETTING}
    return dataclasses.replace(SETTINGS[name], **given)


def _check_args(a: dict, setting: Setting) -> None:
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
    values = {**a, "gamma": setting.gamma}
    for name, (least, allowed) in rules.items():
        if values[name] < least:
            raise ConfigError(f"--{name.replace('_', '-')}: {values[name]} is not allowed; allowed values: {allowed}")
    if not a["lr"] > 0:
        raise ConfigError(f"--lr: {a['lr']} is not allowed; allowed values: a number > 0")
    if not setting.pos_weight > 0:
        raise ConfigError(f"--pos-weight: {setting.pos_weight} is not allowed; allowed values: a number > 0")
    if setting.alpha is not None and not 0 <= setting.alpha <= 1:
        raise ConfigError(f"--alpha: {setting.alpha} is not allowed; allowed values: a number in [0, 1], or none")


def default_out(target: str | Path) -> Path:
    """``<run dir>/dhsa/boundaries.safetensors``: a directory target is its own run dir; a checkpoint file's run
    dir is the folder above ``checkpoints/``."""
    return run_dir_of(target) / "dhsa" / "boundaries.safetensors"


def frozen_attention_layers(target: str, overrides, window: int, setting: Setting, device):
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
    T, least = cfg["data"]["seq_len"], (setting.first + 2) * window
    if T < least:
        raise ConfigError(
            f"data.seq_len: {T} positions leave no labeled candidate; the {setting.name} setting's labels need "
            f">= {least} (p >= {setting.first}·window and p + 2·window <= seq_len)"
        )
    return cfg, model, mixers


def layer_rows(preds, losses, tr_labels, va_keys, va_labels, a: dict, setting: Setting) -> list[dict]:
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
            setting=setting,
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


def print_rows(rows: list[dict], n_val: int, T: int, window: int, threshold: float, setting: Setting) -> None:
    first = setting.first * window
    print(
        f"\nboundary predictors ({setting.name} setting) on {n_val} held-out windows of {T} tokens (labeled "
        f"positions p in [{first}, {T - 2 * window}]; 'pred' = logit > {threshold}; chunk length after NMS)\n"
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


def describe_setting(s: Setting, window: int, ratio: float) -> str:
    rows = f"i >= p + {window + s.row_shift}"
    return (
        f"  setting {s.name}: labels from the head-mean dense causal attention, window {window}, rows {rows}, "
        f"labeled p >= {s.first * window}, mass ratio >= {ratio} (eps {s.eps:g}); focal loss (gamma {s.gamma}, "
        f"alpha {s.alpha}, pos_weight {s.pos_weight}); "
        + ("one predictor shared by all layers" if s.shared else "one predictor per layer")
        + f", LayerNorm({'x + attn(x)' if s.residual else 'attn(x)'}); "
        + (f"AdamW (weight decay {s.weight_decay})" if s.weight_decay else "Adam")
    )


def describe_run(a: dict, skipped: list[int], B: int, T: int, out_path: Path, json_path: Path) -> str:
    return (
        (f"  skipping layers {skipped} (no attention mixer)\n" if skipped else "")
        + f"  train: {a['batches']} batches of {B}x{T} tokens of the train split, {a['steps']} steps "
        f"(lr {a['lr']}, seed {a['seed']})\n"
        f"  eval: {a['val_batches']} batches of the held-out split at threshold {a['threshold']} "
        f"(NMS radius {a['nms_radius']}, max chunk {a['max_chunk']})\n  writing {out_path} and {json_path}"
    )


def dhsa_boundaries(
    target: str,
    overrides=(),
    *,
    setting: str | Setting = "ours",
    batches: int = 32,
    val_batches: int = 8,
    steps: int = 300,
    lr: float = 1e-3,
    seed: int = 0,
    ratio: float = 2.0,
    window: int = _DHSA_DEFAULTS["window"],
    hidden: int = _DHSA_DEFAULTS["predictor_hidden"],
    threshold: float = LEARNED_THRESHOLD,
    nms_radius: int = _DHSA_DEFAULTS["nms_radius"],
    max_chunk: int = _DHSA_DEFAULTS["max_chunk"],
    out: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Label, train, evaluate, write; ``setting``: a name of ``SETTINGS`` or a ``Setting``. Returns {"out",
    "json", "switch", "layers" (per-layer metrics), "predictors" ({layer: BoundaryPredictor}), "losses"
    [steps, n_layers]}."""
    s = resolve_setting(setting) if isinstance(setting, str) else setting
    a = dict(batches=batches, val_batches=val_batches, steps=steps, lr=lr, seed=seed, ratio=ratio, window=window)
    a.update(hidden=hidden, threshold=threshold, nms_radius=nms_radius, max_chunk=max_chunk)
    _check_args(a, s)
    device = device_for()
    cfg, model, mixers = frozen_attention_layers(target, overrides, window, s, device)
    first = next(iter(mixers.values()))
    n_kv, hd, T, B = first.n_kv_heads, first.head_dim, cfg["data"]["seq_len"], cfg["data"]["batch_size"]
    out_path = Path(out) if out else default_out(target)
    json_path = out_path.with_suffix(".json")
    skipped = [i for i in range(len(model.blocks)) if i not in mixers]
    kind = f"{type(first).__name__}, {n_kv} kv heads x {hd} dims"
    print(f"dhsa-boundaries {target} on {device}: layers {sorted(mixers)} ({kind})")
    print(describe_setting(s, window, ratio))
    print(describe_run(a, skipped, B, T, out_path, json_path), flush=True)
    data = LMDataModule(cfg)
    data.setup()
    train_ds = TrainWindows(data.splits["train"]["tokens"], T, B, seed, 0, batches)
    val_ds = ValWindows(data.splits["validation"]["tokens"], T, val_batches * B)
    mib = (batches + val_batches) * B * T * n_kv * hd * 4 * len(mixers) / 2**20
    print(f"  keys kept in memory: {mib:.1f} MiB (float32, {len(mixers)} layers)", flush=True)
    train_windows = [train_ds[i] for i in range(len(train_ds))]
    tr_keys, tr_labels = collect(model, mixers, train_windows, window, ratio, s, "keys (train)", progress)
    val_windows = DataLoader(val_ds, batch_size=B, shuffle=False)
    va_keys, va_labels = collect(model, mixers, val_windows, window, ratio, s, "keys (val)", progress)
    del model
    train_args = {k: a[k] for k in ("window", "hidden", "steps", "lr", "seed")}
    preds, losses = train_predictors(
        tr_keys, tr_labels, n_heads=n_kv, setting=s, device=device, progress=progress, **train_args
    )
    rows = layer_rows(preds, losses, tr_labels, va_keys, va_labels, a, s)
    save_predictors(out_path, preds, ratio, str(Path(target).resolve()), s)
    switch = mixer_switch(out_path, window, hidden, threshold, nms_radius, max_chunk, s)
    result = {"source": str(target), "overrides": list(overrides), "out": str(out_path), "args": a}
    result.update(setting=dataclasses.asdict(s), seq_len=T, batch_size=B, train_windows=len(train_ds) * B)
    result.update(val_windows=len(val_ds), switch=switch, layers=rows)
    atomic_write(json_path, lambda p: Path(p).write_text(json.dumps(result, indent=1)))
    print_rows(rows, len(val_ds), T, window, threshold, s)
    n = "1 predictor shared by all layers" if s.shared else f"{len(preds)} predictors"
    print(f"\nwrote {out_path} ({n}) and {json_path}")
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
    p.add_argument(
        "--setting",
        choices=list(SETTINGS),
        default="ours",
        help="authors: the released code's label rows, loss, one shared predictor without residual, shared "
        "boundaries; ours: per-layer predictors with a residual (see the module docstring)",
    )
    p.add_argument("--batches", type=int, default=32, help="train-split batches (data.batch_size x data.seq_len)")
    p.add_argument("--val-batches", type=int, default=8, help="held-out batches for the evaluation")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (one stored batch per step, all layers)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (AdamW, or Adam in the authors' setting)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init, the batch order and the train windows")
    p.add_argument("--ratio", type=float, default=2.0, help="label 1 where the attention mass ratio across p >= this")
    # loss options: default the setting's (ours: gamma 2, alpha 0.25, pos_weight 1; authors: 2, none, 1.3)
    p.add_argument("--gamma", type=float, default=FROM_SETTING, help="focal loss gamma (0: cross-entropy)")
    p.add_argument("--alpha", type=_alpha, default=FROM_SETTING, help="focal loss alpha of the positives, or 'none'")
    p.add_argument("--pos-weight", type=float, default=FROM_SETTING, help="BCE weight of the positives")
    # default None: the DHSA mixer's own default (arch/dhsa.py), so the predictors fit `model.mixer.type=dhsa`
    p.add_argument("--window", type=int, help="keys on each side of a candidate boundary (mixer.window; default 4)")
    p.add_argument("--hidden", type=int, help="predictor MLP width (mixer.predictor_hidden; default 256)")
    p.add_argument("--threshold", type=float, help="evaluation: boundary where the logit exceeds this (default 1.1)")
    p.add_argument("--nms-radius", type=int, help="evaluation: non-maximum suppression radius (default 8)")
    p.add_argument("--max-chunk", type=int, help="evaluation: maximum chunk length (default 64)")
    p.add_argument("--out", default=None, help="output file (default: <run dir>/dhsa/boundaries.safetensors)")


def run(args: argparse.Namespace) -> None:
    setting = resolve_setting(args.setting, args.gamma, args.alpha, args.pos_weight)
    mixer_opts = {k: getattr(args, k) for k in ("window", "hidden", "threshold", "nms_radius", "max_chunk")}
    dhsa_boundaries(
        args.target,
        args.overrides,
        setting=setting,
        batches=args.batches,
        val_batches=args.val_batches,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        ratio=args.ratio,
        out=args.out,
        **{k: v for k, v in mixer_opts.items() if v is not None},
    )
