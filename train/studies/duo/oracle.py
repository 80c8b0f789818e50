"""Duo-LLM routing oracles: per-token best routes, fixed and random baselines (arXiv 2410.10846, Sec. 4).

    python -m train oracle <checkpoint | run dir | model dir> [--budget K | --all-budgets] [--with-skip] [--batches N]

For every route r in a route space (one choice per layer: small/big, or skip/big with ``--with-skip``), the whole
held-out sequence runs on r and the per-token loss ℓ_t(r) is recorded. Per budget K (exactly K big layers):

* fixed    = min_r mean_t ℓ_t(r)                        (the best single route for all tokens)
* random   = best of 100 draws of a random route per token, mean_t ℓ_t(r_t)
* oracle   = mean_t min_r ℓ_t(r)                        (each token takes its own best route)

plus all-small, all-big and the model's own router (hard argmax; if the checkpoint has one) at the budget it
spends. Token difficulty = ℓ_t(all-small) − ℓ_t(oracle over the whole space).

Route enumeration shares work (``route_losses``): the hidden state after layer j depends only on the routes of
layers <= j, so the route tree is evaluated level by level: each distinct prefix runs layer j's mixer once, and
each child extends it with one FFN choice; every level is batched over prefixes. At L = 8 over the full space this
runs 255 mixers and 510 FFNs instead of 2048 of each (``python -m train bench duo-oracle`` times both).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from arch.duo import BIG, ROUTE_NAMES, SKIP, SMALL, DuoFFN
from arch.registry import ConfigError
from train.checkpoint import load_trained, run_dir_of
from train.cli import add_target
from train.plotting import figure
from train.runs import device_for


def route_space(n_layers: int, low: int = SMALL, budget: Optional[int] = None) -> torch.Tensor:
    """Every route with one of (``low``, BIG) per layer, or only those with exactly ``budget`` big layers:
    LongTensor [R, n_layers], in lexicographic order."""
    routes = torch.tensor(list(itertools.product((low, BIG), repeat=n_layers)), dtype=torch.long)
    if budget is not None:
        routes = routes[(routes == BIG).sum(1) == budget]
    return routes


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # [..., T, V], [..., T] -> [..., T]
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="none").view(targets.shape)


def _chunked(fn: Callable, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn over x[i : i + chunk] along dim 0 (prefixes), concatenated: bounds the memory of one call."""
    return torch.cat([fn(x[i : i + chunk]) for i in range(0, len(x), chunk)])


@torch.no_grad()
def route_losses_naive(model, batch: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
    """ℓ_t(r) by one full forward pass per route: [R, B, T] for a [B, T+1] batch and routes [R, L]."""
    ids, targets = batch[:, :-1], batch[:, 1:]
    routes = routes.to(batch.device)
    return torch.stack(
        [token_losses(model(ids, routes=r[:, None, None].expand(-1, *ids.shape)), targets) for r in routes]
    )


@torch.no_grad()
def route_losses(model, batch: torch.Tensor, routes: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """ℓ_t(r) for every route, by prefix sharing: [R, B, T] for a [B, T+1] batch and routes [R, L].

    Level j holds one hidden state per distinct route prefix of length j (``states`` [P_j, B, T, D]); layer j's
    mixer runs once per prefix, then each distinct child (prefix, route of layer j) adds its FFN choice, computed
    for all children with that choice in one batched call. ``chunk`` prefixes go through a module at a time.
    """
    ids, targets = batch[:, :-1], batch[:, 1:]  # [B, T]
    B, T = ids.shape
    routes = routes.to(batch.device)
    states = model.tok_emb(ids)[None]  # [1, B, T, D]: the empty prefix
    parent = torch.zeros(len(routes), dtype=torch.long, device=batch.device)  # [R] each route's prefix in `states`
    for j, block in enumerate(model.blocks):
        mid = _chunked(lambda s, block=block: block.attend(s.flatten(0, 1)).view_as(s), states, chunk)  # [P_j, B, T, D]
        # distinct children (prefix, choice at layer j) and each route's child
        children, child_of_route = torch.unique(torch.stack([parent, routes[:, j]], 1), dim=0, return_inverse=True)
        new_states = mid.new_empty(len(children), *mid.shape[1:])  # [P_{j+1}, B, T, D]
        for choice in children[:, 1].unique().tolist():
            sel = (children[:, 1] == choice).nonzero().squeeze(1)  # children taking `choice` at layer j
            x = mid[children[sel, 0]]  # [n, B, T, D]

            def ffn(s: torch.Tensor, block=block, choice=choice) -> torch.Tensor:  # [n, B, T, D], all on `choice`
                route = torch.full((s.shape[0] * B, T), choice, device=s.device)  # [n*B, T]
                return block.feed_forward(s.flatten(0, 1), route=route).view_as(s)

            new_states[sel] = _chunked(ffn, x, chunk)
        states, parent = new_states, child_of_route
    logits = lambda s: model.head(model.norm_f(s))  # noqa: E731
    losses = _chunked(lambda s: token_losses(logits(s), targets.expand(len(s), B, T)), states, chunk)  # [P_L, B, T]
    return losses[parent]  # [R, B, T]


def best_of_random(losses: torch.Tensor, n_draws: int = 100, seed: int = 0) -> float:
    """Best (lowest) mean loss of ``n_draws`` draws that give every token its own uniformly random route
    (``losses`` [R, N]); the paper's best-of-100 random baseline."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.arange(losses.shape[1])
    return min(
        losses[torch.randint(len(losses), (losses.shape[1],), generator=g), cols].mean().item() for _ in range(n_draws)
    )


def summarise(losses: torch.Tensor, routes: torch.Tensor, budgets: list[int]) -> list[dict]:
    """Per budget K: fixed, best-of-100 random and oracle mean losses over the routes with K big layers, the best
    fixed route, and how often the oracle's route uses the big module in each layer. ``losses`` [R, N]."""
    rows = []
    n_big = (routes == BIG).sum(1)  # [R]
    for k in budgets:
        sel = (n_big == k).nonzero().squeeze(1)
        lk = losses[sel]  # [R_k, N]
        mean = lk.mean(1)  # [R_k]
        best_per_token = lk.argmin(0)  # [N]
        oracle_routes = routes[sel][best_per_token]  # [N, L]
        rows.append(
            {
                "budget": k,
                "n_routes": len(sel),
                "fixed_loss": mean.min().item(),
                "fixed_route": routes[sel[mean.argmin()]].tolist(),
                "random100_loss": best_of_random(lk, seed=k),
                "oracle_loss": lk.min(0).values.mean().item(),
                "oracle_big_fraction": (oracle_routes == BIG).float().mean(0).tolist(),  # [L]
            }
        )
    return rows


def route_str(route: list[int]) -> str:
    return "".join("SsB"[r] for r in route)  # S = skip, s = small, B = big, layer 0 first


def show_in_context(tokenizer, window: torch.Tensor, t: int, width: int = 60) -> str:
    """The text before target token t of a [T+1] window, then the token in [[ ]]."""
    before = tokenizer.decode(window[max(0, t + 1 - width) : t + 1].tolist())
    return (before + "[[" + tokenizer.decode(window[t + 1 : t + 2].tolist()) + "]]").replace("\n", "⏎")


def plot(result: dict, out: Path) -> list[Path]:
    """ppl_vs_budget.png: oracle, best fixed and random baselines per budget; oracle_big_heatmap.png: how often
    the oracle routes a token big, per layer and budget."""
    import matplotlib.ticker

    rows, L = result["per_budget"], result["n_layers"]
    ks = [r["budget"] for r in rows]
    paths = [out / "ppl_vs_budget.png", out / "oracle_big_heatmap.png"]
    with figure(paths[0], (6.4, 4.2)) as (fig, ax):
        for key, label, style in (
            ("oracle_loss", "oracle (per token)", "o-"),
            ("fixed_loss", "best fixed route", "s-"),
            ("random100_loss", "best of 100 random", "^-"),
        ):
            ax.plot(ks, [math.exp(r[key]) for r in rows], style, label=label)
        ax.axhline(result["all_small_ppl"], color="gray", ls=":", label="all small")
        ax.axhline(result["all_big_ppl"], color="k", ls="--", label="all big")
        if result["router"]:
            ax.plot([result["router"]["mean_big_layers"]], [result["router"]["ppl"]], "r*", ms=14, label="router")
        ax.set(
            xlabel=f"budget: big layers of {L}",
            ylabel="perplexity (held-out, log scale)",
            yscale="log",
            title=f"Duo routing oracles ({result['route_space']})",
        )
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
        ax.legend(fontsize=8)
    with figure(paths[1], (6.4, 3.8)) as (fig, ax):
        heat = torch.tensor([r["oracle_big_fraction"] for r in rows]).T.numpy()  # [L, budgets]
        extent = (ks[0] - 0.5, ks[-1] + 0.5, -0.5, L - 0.5)
        im = ax.imshow(heat, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, extent=extent)
        ax.set(xlabel="budget K (big layers)", ylabel="layer", title="how often the oracle routes a token big")
        fig.colorbar(im, ax=ax, label="fraction of tokens")
    return paths


def held_out_windows(cfg: dict, batches: int, device) -> list[torch.Tensor]:
    """The first ``batches`` validation batches ([B, T+1] each) of the config's data."""
    from train.datamodules import LMDataModule

    data = LMDataModule(cfg, full_validation=True)
    data.setup()
    return [w.to(device) for w in itertools.islice(iter(data.val_dataloader()), batches)]


@torch.no_grad()
def collect(model, windows: list[torch.Tensor], routes: torch.Tensor, chunk: int) -> dict[str, torch.Tensor]:
    """Per-token losses over all windows: "routes" [R, N] (every route), "small" and "big" [N] (all-small and
    all-big), and with routers "router" [N] (hard argmax routes) and "router_big" (mean big layers)."""
    duo = [m for m in model.modules() if isinstance(m, DuoFFN)]
    L = len(model.blocks)
    all_small, all_big = route_space(L, SMALL, 0), route_space(L, SMALL, L)  # [1, L] each
    out = {"routes": [], "small": [], "big": [], "router": [], "router_big": []}
    for i, w in enumerate(windows):
        out["routes"].append(route_losses(model, w, routes, chunk).flatten(1))  # [R, B*T]
        out["small"].append(route_losses_naive(model, w, all_small)[0].flatten())  # [B*T]
        out["big"].append(route_losses_naive(model, w, all_big)[0].flatten())
        if all(m.routing == "router" for m in duo):
            out["router"].append(token_losses(model(w[:, :-1]), w[:, 1:]).flatten())  # eval: hard argmax routes
            out["router_big"].append(torch.tensor(sum(m.route_fraction[BIG].item() for m in duo)))
        print(f"  batch {i + 1}/{len(windows)}", flush=True)
    result = {"routes": torch.cat(out["routes"], 1).cpu(), "small": torch.cat(out["small"]).cpu()}
    result["big"] = torch.cat(out["big"]).cpu()
    if out["router"]:
        result["router"] = torch.cat(out["router"]).cpu()
        result["router_big"] = torch.stack(out["router_big"]).mean()
    return result


def difficult_tokens(losses: dict, routes: torch.Tensor, windows: list[torch.Tensor], tokenizer, n: int) -> list[dict]:
    """The ``n`` tokens with the largest loss(all small) − loss(oracle over the whole evaluated space)."""
    oracle_loss = losses["routes"].min(0).values  # [N]
    difficulty = losses["small"] - oracle_loss
    T = windows[0].shape[1] - 1
    flat_windows = torch.cat(windows).cpu()  # [n_windows, T+1]
    return [
        {
            "difficulty": difficulty[i].item(),
            "loss_all_small": losses["small"][i].item(),
            "loss_oracle": oracle_loss[i].item(),
            "oracle_route": route_str(routes[losses["routes"][:, i].argmin()].tolist()),
            "in_context": show_in_context(tokenizer, flat_windows[i // T], i % T),
        }
        for i in difficulty.topk(min(n, len(difficulty))).indices.tolist()
    ]


def print_report(result: dict) -> None:
    router = result["router"]
    line = f"\nall small: ppl {result['all_small_ppl']:.3f} | all big: ppl {result['all_big_ppl']:.3f}"
    if router:
        line += f" | router: ppl {router['ppl']:.3f} at {router['mean_big_layers']:.2f} big layers on average"
    print(line)
    print("\n| big layers K | routes | best fixed (route) | best of 100 random | oracle |\n|---:|---:|---|---:|---:|")
    for r in result["per_budget"]:
        print(
            f"| {r['budget']} | {r['n_routes']} | {r['fixed_ppl']:.3f} ({route_str(r['fixed_route'])}) | "
            f"{r['random100_ppl']:.3f} | {r['oracle_ppl']:.3f} |"
        )
    print("\n(routes: layer 0 first; s = small, S = skip, B = big)")
    print("\noracle: fraction of tokens routed big, layer x budget")
    print("layer " + " ".join(f"K={r['budget']:<3}" for r in result["per_budget"]))
    for j in range(result["n_layers"]):
        print(f"{j:>5} " + " ".join(f"{r['oracle_big_fraction'][j]:5.2f}" for r in result["per_budget"]))
    print("\nmost difficult tokens (loss all-small - loss oracle), target in [[ ]]:")
    for d in result["difficult_tokens"]:
        print(f"  {d['difficulty']:6.2f}  {d['oracle_route']}  …{d['in_context']}")


def oracle(
    target: str,
    overrides=(),
    budget: Optional[int] = None,
    with_skip: bool = False,
    batches: int = 8,
    out_dir: Optional[str] = None,
    chunk: int = 16,
    n_difficult: int = 12,
) -> dict:
    """Run the oracle study on a duo checkpoint; print the table, write oracle.json and two PNGs."""
    from train.data import build_tokenizer

    device = device_for()
    cfg, model = load_trained(target, overrides, map_location=device)
    L, n_duo = len(model.blocks), sum(isinstance(m, DuoFFN) for m in model.modules())
    if n_duo != L:
        raise ConfigError(f"model.ffn: the oracle needs a duo FFN in every layer ({n_duo} of {L} layers have one)")
    if budget is not None and not 0 <= budget <= L:
        raise ConfigError(f"--budget {budget}: must be between 0 and the number of layers, {L}")
    low = SKIP if with_skip else SMALL
    space, routes = f"{ROUTE_NAMES[low]}/big", route_space(L, low, budget)
    budgets = list(range(L + 1)) if budget is None else [budget]
    out = Path(out_dir) if out_dir else run_dir_of(target) / "oracle"
    windows = held_out_windows(cfg, batches, device)
    n_tok = sum(w[:, 1:].numel() for w in windows)
    print(
        f"oracle {target} on {device}: {L} layers, {space} routes ({len(routes)} routes, budgets "
        f"{budgets[0]}-{budgets[-1]}), {len(windows)} held-out batches = {n_tok} tokens; prefix-sharing route "
        f"tree, {chunk} prefixes per call\n  writing {out}/ (oracle.json, ppl_vs_budget.png, oracle_big_heatmap.png)",
        flush=True,
    )
    losses = collect(model, windows, routes, chunk)
    result = {
        "checkpoint": str(target),
        "route_space": space,
        "n_layers": L,
        "tokens": n_tok,
        "n_routes": len(routes),
        "all_small_ppl": math.exp(losses["small"].mean().item()),
        "all_big_ppl": math.exp(losses["big"].mean().item()),
        "per_budget": summarise(losses["routes"], routes, budgets),
        "router": None,
    }
    if "router" in losses:
        result["router"] = {
            "ppl": math.exp(losses["router"].mean().item()),
            "mean_big_layers": losses["router_big"].item(),
        }
    for r in result["per_budget"]:
        r.update({k.replace("_loss", "_ppl"): math.exp(r[k]) for k in ("fixed_loss", "random100_loss", "oracle_loss")})
    tokenizer = build_tokenizer(cfg["data"]["tokenizer"])
    result["difficult_tokens"] = difficult_tokens(losses, routes, windows, tokenizer, n_difficult)
    print_report(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "oracle.json").write_text(json.dumps(result, indent=1))
    paths = plot(result, out)
    print(f"\nwrote {out / 'oracle.json'}, " + ", ".join(str(p) for p in paths))
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target(p, "checkpoint file, run directory, or exported model directory of a duo model")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", type=int, default=None, help="only routes with exactly K big layers")
    g.add_argument("--all-budgets", action="store_true", help="every route, reported per budget K = 0..L (default)")
    p.add_argument("--with-skip", action="store_true", help="route space big/skip instead of big/small")
    p.add_argument("--batches", type=int, default=8, help="held-out batches (data.batch_size x data.seq_len tokens)")
    p.add_argument("--out", default=None, help="output folder (default: <run dir>/oracle)")
    p.add_argument("--chunk", type=int, default=16, help="route prefixes per batched module call")


def run(args: argparse.Namespace) -> None:
    oracle(args.target, args.overrides, args.budget, args.with_skip, args.batches, args.out, args.chunk)
