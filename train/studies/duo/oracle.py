"""Duo-LLM routing oracles: per-token best routes beside fixed, random, router and control baselines (arXiv
2410.10846, Sec. 4).

    python -m train oracle <checkpoint | run dir | model dir> [--space small-big | skip-big | skip-small-big]
        [--budget K | --all-budgets] [--routers RUN ...] [--control RUN] [--random-per text | sequence] [--batches N]

For every route r of the route space (one FFN choice per layer: small/big, skip/big or skip/small/big; see
``routes``), the whole held-out sequence runs on r and the per-token loss ℓ_t(r) is recorded. Per budget K
(exactly K big layers) it reports, as perplexities (``summary`` has the definitions):

* best fixed route     min_r mean_t ℓ_t(r)
* mean of routes       mean_r mean_t ℓ_t(r): one random route, on average
* best of 100 random   100 trials, each a whole route assignment (a random set of K big layers, drawn for the whole
                       text, or for each sequence with ``--random-per sequence``), the lowest mean loss kept
* oracle               mean_t min_r ℓ_t(r)

plus all-small and all-big, and:

* routers (``--routers``, and the checkpoint itself if it routes): each one's hard-argmax perplexity at the
  mean number of big layers it spends, drawn as a curve; only routers trained in this route space (small/big
  routers; skip/small/big with ``router_skip``) and on this checkpoint's weights (a frozen backbone);
* a control (``--control``, small/big space only): the same statistics on a model whose small and big modules
  are the same size (``configs/lm/duo-tiny-control.yaml``), so no route is better than another except by chance:
  its oracle gain over its best fixed route is what a per-token minimum over that many routes gains on noise.

Token difficulty = ℓ_t(all-small) − ℓ_t(oracle over the routes evaluated), within the space (all-skip stands
for all-small in the skip/big space, which has no small module). Writes oracle.json, ppl_vs_budget.png and
oracle_big_heatmap.png.

Routes cover the routed layers (those with a duo FFN, ``routes.routed_layers``): a model with duo FFNs in only
some layers is studied over those, the other layers running as they are (the command says which); budgets count
big layers among the routed ones. The route tree runs the layers one at a time, so mixers that pass state down
the layers within one forward (DHSA ``share_boundaries``) are refused.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from arch.duo import BIG, ROUTE_NAMES, SKIP, SMALL, DuoFFN
from arch.registry import ConfigError
from train.checkpoint import load_trained, run_dir_of
from train.cli import add_target
from train.runs import device_for

from .report import plot, print_report, route_str
from .routes import SPACES, route_losses, route_losses_naive, route_space, routed_layers, token_losses
from .summary import RANDOM_PER, summarise


def duo_layers(model) -> list[DuoFFN]:
    return [m for m in model.modules() if isinstance(m, DuoFFN)]


def show_in_context(tokenizer, window: torch.Tensor, t: int, width: int = 60) -> str:
    """The text before target token t of a [T+1] window, then the token in [[ ]]."""
    before = tokenizer.decode(window[max(0, t + 1 - width) : t + 1].tolist())
    return (before + "[[" + tokenizer.decode(window[t + 1 : t + 2].tolist()) + "]]").replace("\n", "⏎")


def held_out_windows(cfg: dict, batches: int, device) -> list[torch.Tensor]:
    """The first ``batches`` validation batches ([B, T+1] each) of the config's data."""
    from train.datamodules import LMDataModule

    data = LMDataModule(cfg, full_validation=True)
    data.setup()
    return [w.to(device) for w in itertools.islice(iter(data.val_dataloader()), batches)]


@torch.no_grad()
def space_losses(model, windows, routes, chunk: int, max_states: int, log=print) -> torch.Tensor:
    """ℓ_t(r) of every route over all windows: [R, S, T] (S = all sequences of all windows)."""
    out = []
    for i, w in enumerate(windows):
        out.append(route_losses(model, w, routes, chunk, max_states).cpu())
        log(f"  batch {i + 1}/{len(windows)}")
    return torch.cat(out, 1)


@torch.no_grad()
def fixed_route_losses(model, windows, route: int) -> torch.Tensor:
    """ℓ_t of the route taking ``route`` in every routed layer: [S, T]."""
    all_one = torch.full((1, len(routed_layers(model))), route)
    return torch.cat([route_losses_naive(model, w, all_one)[0].cpu() for w in windows])


@torch.no_grad()
def router_losses(model, windows) -> tuple[torch.Tensor, torch.Tensor]:
    """A router model's own hard-argmax routes: token losses [S, T] and route fractions per layer [L, 3]."""
    losses, fractions = [], []
    for w in windows:
        losses.append(token_losses(model(w[:, :-1]), w[:, 1:]).cpu())
        fractions.append(torch.stack([m.route_fraction.cpu() for m in duo_layers(model)]))
    return torch.cat(losses), torch.stack(fractions).mean(0)


def router_space(model) -> str:
    return "skip-small-big" if duo_layers(model)[0].router_skip else "small-big"


def is_router(model) -> bool:
    return all(m.routing == "router" for m in duo_layers(model))


def backbone_difference(model, other) -> Optional[str]:
    """The first weight (outside the routers) in which ``other`` differs from ``model``, or None."""
    theirs = other.state_dict()
    for k, v in model.state_dict().items():
        if ".ffn.router." not in k and (k not in theirs or not torch.equal(v, theirs[k].to(v.device))):
            return k
    return None


def load_routers(target: str, model, cfg: dict, sources: list[str], device) -> list[tuple[str, dict, object]]:
    """(name, config, model) of every router to evaluate: the checkpoint itself if it routes, then ``sources``,
    each checked to share the checkpoint's weights outside its routers."""
    routers = [(str(target), cfg, model)] if is_router(model) else []
    for src in sources:
        rcfg, rmodel = load_trained(src, map_location=device)
        if routed_layers(rmodel) != routed_layers(model) or not is_router(rmodel):
            raise ConfigError(
                f"--routers {src}: not a duo model with a router in every routed layer of {target} "
                f"(layers {routed_layers(model)}; model.ffn.routing)"
            )
        diff = backbone_difference(model, rmodel)
        if diff:
            raise ConfigError(
                f"--routers {src}: its weights differ from {target}'s outside the routers (first: {diff}); "
                f"train routers on this model with optim.freeze_backbone=true (fit --init-from {target})"
            )
        routers.append((str(src), rcfg, rmodel))
    return routers


def evaluate_routers(routers, space: str, windows) -> tuple[list[dict], list[str]]:
    """Per router of this route space: budget, perplexity, mean big layers, route fractions per layer [L, 3];
    and the names of the routers left out (trained in another space)."""
    rows, left_out = [], []
    for name, rcfg, rmodel in routers:
        if router_space(rmodel) != space:
            left_out.append(f"{name} (routes over {router_space(rmodel)})")
            continue
        losses, fractions = router_losses(rmodel, windows)
        rows.append(
            {
                "run": name,
                "budget": rcfg["optim"]["router_budget"],
                "ppl": math.exp(losses.mean().item()),
                "mean_big_layers": fractions[:, BIG].sum().item(),
                "route_fraction": fractions.tolist(),  # [L, 3]: skip, small, big
            }
        )
    return sorted(rows, key=lambda r: r["mean_big_layers"]), left_out


def with_ppl(rows: list[dict]) -> list[dict]:
    for r in rows:
        r.update({k[: -len("_loss")] + "_ppl": math.exp(v) for k, v in list(r.items()) if k.endswith("_loss")})
    return rows


def difficult_tokens(losses: torch.Tensor, reference: torch.Tensor, routes, windows, tokenizer, n) -> list[dict]:
    """The ``n`` tokens with the largest ℓ_t(reference route) − ℓ_t(oracle over ``routes``); ``losses`` [R, S, T],
    ``reference`` [S, T]."""
    oracle_loss, best = losses.min(0)  # [S, T]
    difficulty = (reference - oracle_loss).flatten()
    T = losses.shape[2]
    flat_windows = torch.cat(windows).cpu()  # [S, T+1]
    return [
        {
            "difficulty": difficulty[i].item(),
            "loss_reference": reference.flatten()[i].item(),
            "loss_oracle": oracle_loss.flatten()[i].item(),
            "oracle_route": route_str(routes[best.flatten()[i]].tolist()),
            "in_context": show_in_context(tokenizer, flat_windows[i // T], i % T),
        }
        for i in difficulty.topk(min(n, len(difficulty))).indices.tolist()
    ]


def control_result(source: str, cfg: dict, layers: list[int], windows, routes, budgets, opts, device) -> dict:
    """The control model's statistics over the same routes and held-out windows."""
    ccfg, cmodel = load_trained(source, map_location=device)
    if routed_layers(cmodel) != layers:
        raise ConfigError(
            f"--control {source}: its duo FFNs are in layers {routed_layers(cmodel)}; the model's in {layers}"
        )
    if ccfg["data"]["tokenizer"] != cfg["data"]["tokenizer"]:
        raise ConfigError(f"--control {source}: tokenizer {ccfg['data']['tokenizer']!r}, the model's is different")
    losses = space_losses(cmodel, windows, routes, opts["chunk"], opts["max_states"], log=lambda s: None)
    layer0 = duo_layers(cmodel)[0]
    return {
        "checkpoint": str(source),
        "d_ff_small": layer0.small.w1.weight.shape[0],
        "d_ff_big": layer0.big.w1.weight.shape[0],
        "per_budget": with_ppl(summarise(losses, routes, budgets, opts["random_per"])),
    }


def check_request(model, budget: Optional[int], space: str, control: Optional[str]) -> None:
    D = len(routed_layers(model))
    if D == 0:
        raise ConfigError("model.ffn: the oracle needs a duo FFN (ffn: {type: duo}) in at least one layer; none has")
    if any(getattr(m, "share_boundaries", False) for m in model.modules()):
        raise ConfigError(
            "mixer.share_boundaries: the oracle's route tree runs one layer at a time, so layers cannot share "
            "state within a forward; set share_boundaries: false (or override it on the command line)"
        )
    if budget is not None and not 0 <= budget <= D:
        raise ConfigError(f"--budget {budget}: must be between 0 and the number of routed (duo) layers, {D}")
    if control and space != "small-big":
        raise ConfigError(
            f"--control with --space {space}: the control's routes carry no signal only between its small and big "
            "modules (skip differs from both), so a control needs --space small-big"
        )


def routed_layers_note(model) -> str:
    """Which layers the routes cover, and what the others do."""
    layers, L = routed_layers(model), len(model.blocks)
    if len(layers) == L:
        return f"routes cover all {L} layers (each has a duo FFN)"
    skipped = [f"{j} ({type(b.ffn).__name__})" for j, b in enumerate(model.blocks) if j not in layers]
    return (
        f"routes cover the {len(layers)} layers with a duo FFN: {layers}; layers without one are skipped by the "
        f"routing and run as they are on every route: {', '.join(skipped)}"
    )


def study(target: str, cfg: dict, model, windows, routes, budgets, routers, control, opts: dict, device) -> dict:
    """Every statistic of the oracle command (printing only the progress of the route losses)."""
    space, L, layers = opts["space"], len(model.blocks), routed_layers(model)
    start = time.perf_counter()
    losses = space_losses(model, windows, routes, opts["chunk"], opts["max_states"], lambda s: print(s, flush=True))
    seconds = time.perf_counter() - start
    ref_route = SMALL if SMALL in SPACES[space] else SKIP  # all-small, or all-skip in the skip/big space
    refs = {ROUTE_NAMES[r]: fixed_route_losses(model, windows, r) for r in {SMALL, BIG, ref_route}}
    router_rows, left_out = evaluate_routers(routers, space, windows)
    result = {
        "checkpoint": str(target),
        "route_space": space,
        "n_layers": L,
        "routed_layers": layers,
        "tokens": sum(w[:, 1:].numel() for w in windows),
        "n_routes": len(routes),
        "route_losses_seconds": seconds,
        "device": str(device),
        "random_per": opts["random_per"],
        "all_small_ppl": math.exp(refs["small"].mean().item()),
        "all_big_ppl": math.exp(refs["big"].mean().item()),
        "per_budget": with_ppl(summarise(losses, routes, budgets, opts["random_per"])),
        "routers": router_rows,
        "routers_left_out": left_out,
        "control": control_result(control, cfg, layers, windows, routes, budgets, opts, device) if control else None,
        "difficulty_reference": "all-" + ROUTE_NAMES[ref_route],
    }
    from train.data import build_tokenizer

    reference = refs[ROUTE_NAMES[ref_route]]  # [S, T]
    tokenizer = build_tokenizer(cfg["data"]["tokenizer"])
    result["difficult_tokens"] = difficult_tokens(losses, reference, routes, windows, tokenizer, opts["n_difficult"])
    return result


def oracle(
    target: str,
    overrides=(),
    space: str = "small-big",
    budget: Optional[int] = None,
    routers: tuple[str, ...] = (),
    control: Optional[str] = None,
    random_per: str = "text",
    batches: int = 8,
    out_dir: Optional[str] = None,
    chunk: int = 16,
    max_states: int = 512,
    n_difficult: int = 12,
) -> dict:
    """Run the oracle study on a duo checkpoint; print the tables, write oracle.json and two PNGs."""
    device = device_for()
    cfg, model = load_trained(target, overrides, map_location=device)
    check_request(model, budget, space, control)
    L, layers = len(model.blocks), routed_layers(model)
    routes, budgets = (
        route_space(len(layers), space, budget),
        (list(range(len(layers) + 1)) if budget is None else [budget]),
    )
    out = Path(out_dir) if out_dir else run_dir_of(target) / "oracle"
    windows = held_out_windows(cfg, batches, device)
    router_models = load_routers(target, model, cfg, list(routers), device)
    print(routed_layers_note(model), flush=True)
    print(
        f"oracle {target} on {device}: {L} layers, {space} route space ({len(routes)} routes, budgets "
        f"{budgets[0]}-{budgets[-1]}), {len(windows)} held-out batches = {sum(w[:, 1:].numel() for w in windows)} "
        f"tokens; prefix-sharing route tree ({chunk} prefixes per call, at most {max_states} states held); "
        f"{len(router_models)} router(s){', control ' + control if control else ''}\n  writing {out}/ "
        "(oracle.json, ppl_vs_budget.png, oracle_big_heatmap.png)",
        flush=True,
    )
    opts = {"space": space, "chunk": chunk, "max_states": max_states, "random_per": random_per}
    opts["n_difficult"] = n_difficult
    result = study(target, cfg, model, windows, routes, budgets, router_models, control, opts, device)
    print_report(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "oracle.json").write_text(json.dumps(result, indent=1))
    paths = plot(result, out)
    print(f"\nwrote {out / 'oracle.json'}, " + ", ".join(str(p) for p in paths))
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target(p, "checkpoint file, run directory, or exported model directory of a duo model")
    p.add_argument("--space", choices=tuple(SPACES), default="small-big", help="route space (default small-big)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", type=int, default=None, help="only routes with exactly K big layers")
    g.add_argument("--all-budgets", action="store_true", help="every route, reported per budget K = 0..L (default)")
    p.add_argument("--routers", nargs="+", default=[], help="router runs trained on this checkpoint (one per budget)")
    p.add_argument("--control", default=None, help="a control model's run (configs/lm/duo-tiny-control.yaml)")
    p.add_argument(
        "--random-per", choices=RANDOM_PER, default="text", help="a random trial draws one route per: text, sequence"
    )
    p.add_argument("--batches", type=int, default=8, help="held-out batches (data.batch_size x data.seq_len tokens)")
    p.add_argument("--out", default=None, help="output folder (default: <run dir>/oracle)")
    p.add_argument("--chunk", type=int, default=16, help="route prefixes per batched module call")
    p.add_argument("--max-states", type=int, default=512, help="hidden states [B, T, D] held at once at most")


def run(args: argparse.Namespace) -> None:
    oracle(
        args.target,
        args.overrides,
        space=args.space,
        budget=args.budget,
        routers=tuple(args.routers),
        control=args.control,
        random_per=args.random_per,
        batches=args.batches,
        out_dir=args.out,
        chunk=args.chunk,
        max_states=args.max_states,
    )
