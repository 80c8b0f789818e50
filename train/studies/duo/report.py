"""The oracle command's printed tables and figures (from the result dict that ``oracle.study`` returns)."""

from __future__ import annotations

from pathlib import Path

import torch

from train.plotting import figure

SPACE_NAMES = {"small-big": "small/big", "skip-big": "skip/big", "skip-small-big": "skip/small/big"}


def route_str(route: list[int]) -> str:
    return "".join("SsB"[r] for r in route)  # S = skip, s = small, B = big, first routed layer first


def gain(row: dict) -> float:
    """The oracle's gain over the best fixed route of its budget, in % of perplexity."""
    return 100 * (1 - row["oracle_ppl"] / row["fixed_ppl"])


def layers_str(result: dict) -> str:
    layers = result["routed_layers"]
    return f"all {len(layers)} layers" if len(layers) == result["n_layers"] else f"layers {layers}"


def baseline_table(result: dict) -> list[str]:
    per_text = result["random_per"] == "text"
    lines = [
        "| big layers K | routes | best fixed (route) | mean of routes | best of 100 random"
        + (" (route)" if per_text else ", one route per sequence")
        + " | oracle |",
        "|---:|---:|---|---:|---|---:|",
    ]
    for r in result["per_budget"]:
        rand = f"{r['random_ppl']:.3f}" + (f" ({route_str(r['random_route'])})" if per_text else "")
        lines.append(
            f"| {r['budget']} | {r['n_routes']} | {r['fixed_ppl']:.3f} ({route_str(r['fixed_route'])}) | "
            f"{r['mean_route_ppl']:.3f} | {rand} | {r['oracle_ppl']:.3f} |"
        )
    trial = "the whole text" if per_text else "each sequence"
    lines += [
        "",
        f"routes: one letter per routed layer ({layers_str(result)}), first layer first; s = small, S = skip, "
        "B = big. Perplexity = exp(mean token loss).",
        "mean of routes: the mean over the K-big routes of their mean loss (one random route, on average).",
        f"best of 100 random: 100 trials, each one route with exactly K big layers drawn uniformly (a random set of K "
        f"big layers) for {trial}; the lowest mean loss of the 100.",
        "oracle: each token's own best route among the K-big routes.",
    ]
    return lines


def control_table(result: dict) -> list[str]:
    c = result["control"]
    if c["d_ff_small"] == c["d_ff_big"]:
        what = (
            f"small and big modules of the same size (d_ff {c['d_ff_big']}), trained alike: its routes carry no "
            "signal, so its oracle gain is what a per-token minimum over that many routes gains by chance"
        )
    else:
        what = f"small d_ff {c['d_ff_small']}, big d_ff {c['d_ff_big']}: not the same size, its routes may carry signal"
    lines = [
        f"control {c['checkpoint']}: {what}",
        "",
        "| big layers K | routes | model: best fixed -> oracle | oracle gain | control: best fixed -> oracle "
        "| control oracle gain |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r, cr in zip(result["per_budget"], c["per_budget"]):
        lines.append(
            f"| {r['budget']} | {r['n_routes']} | {r['fixed_ppl']:.3f} -> {r['oracle_ppl']:.3f} | {gain(r):.1f}% | "
            f"{cr['fixed_ppl']:.3f} -> {cr['oracle_ppl']:.3f} | {gain(cr):.1f}% |"
        )
    return lines


def router_table(result: dict) -> list[str]:
    lines = [
        "| router (optim.router_budget) | big layers (mean) | ppl | fraction of tokens big per layer |",
        "|---:|---:|---:|---|",
    ]
    for r in result["routers"]:
        per_layer = " ".join(f"{f[2]:.2f}" for f in r["route_fraction"])
        lines.append(f"| {r['budget']} | {r['mean_big_layers']:.2f} | {r['ppl']:.3f} | {per_layer} |")
    return lines


def print_report(result: dict) -> None:
    space = SPACE_NAMES[result["route_space"]]
    print(
        f"\n{space} route space: {result['n_routes']} routes, {result['tokens']} held-out tokens; route losses in "
        f"{result['route_losses_seconds']:.0f} s on {result['device']}"
    )
    print(f"all small: ppl {result['all_small_ppl']:.3f} | all big: ppl {result['all_big_ppl']:.3f}\n")
    print("\n".join(baseline_table(result)))
    if result["control"]:
        print("\n" + "\n".join(control_table(result)))
    if result["routers"]:
        print(f"\nrouters (hard argmax routes, trained in the {space} space):\n" + "\n".join(router_table(result)))
    for name in result["routers_left_out"]:
        print(f"router left out (not trained in the {space} space): {name}")
    print("\noracle: fraction of tokens routed big, layer x budget")
    print("layer " + " ".join(f"K={r['budget']:<3}" for r in result["per_budget"]))
    for i, layer in enumerate(result["routed_layers"]):
        print(f"{layer:>5} " + " ".join(f"{r['oracle_big_fraction'][i]:5.2f}" for r in result["per_budget"]))
    ref = result["difficulty_reference"]
    print(
        f"\nmost difficult tokens: loss({ref}) - loss(oracle over all {result['n_routes']} {space} routes), "
        "target in [[ ]]:"
    )
    for d in result["difficult_tokens"]:
        print(f"  {d['difficulty']:6.2f}  {d['oracle_route']}  …{d['in_context']}")


def plot(result: dict, out: Path) -> list[Path]:
    """ppl_vs_budget.png: oracle, best fixed, random baselines and routers per budget, and the oracle's gain
    over the best fixed route beside the control's; oracle_big_heatmap.png: how often the oracle routes a token
    big, per layer and budget."""
    paths = [out / "ppl_vs_budget.png", out / "oracle_big_heatmap.png"]
    with figure(paths[0], (11, 4.2), ncols=2, width_ratios=(3, 2)) as (fig, (ax, ax_gain)):
        budget_panel(ax, result)
        gain_panel(ax_gain, result)
    with figure(paths[1], (6.4, 3.8)) as (fig, ax):
        rows, layers = result["per_budget"], result["routed_layers"]
        ks = [r["budget"] for r in rows]
        heat = torch.tensor([r["oracle_big_fraction"] for r in rows]).T.numpy()  # [D routed layers, budgets]
        extent = (ks[0] - 0.5, ks[-1] + 0.5, -0.5, len(layers) - 0.5)
        im = ax.imshow(heat, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, extent=extent)
        ax.set(xlabel="budget K (big layers)", ylabel="layer", title="how often the oracle routes a token big")
        ax.set_yticks(range(len(layers)), [str(j) for j in layers])
        fig.colorbar(im, ax=ax, label="fraction of tokens")
    return paths


def budget_panel(ax, result: dict) -> None:
    import matplotlib.ticker

    rows = result["per_budget"]
    ks = [r["budget"] for r in rows]
    for key, label, style in (
        ("oracle_ppl", "oracle (per token)", "o-"),
        ("fixed_ppl", "best fixed route", "s-"),
        ("random_ppl", f"best of 100 random (one route per {result['random_per']})", "^-"),
        ("mean_route_ppl", "mean of routes", "x:"),
    ):
        ax.plot(ks, [r[key] for r in rows], style, label=label, color=None if key != "mean_route_ppl" else "tab:purple")
    ax.axhline(result["all_small_ppl"], color="gray", ls=":", label="all small")
    ax.axhline(result["all_big_ppl"], color="k", ls="--", label="all big")
    if result["routers"]:
        xs, ys = [r["mean_big_layers"] for r in result["routers"]], [r["ppl"] for r in result["routers"]]
        ax.plot(xs, ys, "r*-", ms=11, label="routers (one per budget)")
        for r in result["routers"]:
            where = (r["mean_big_layers"], r["ppl"])
            ax.annotate(f"{r['budget']:g}", where, textcoords="offset points", xytext=(4, 4), fontsize=7, color="r")
    ax.set(
        xlabel=f"budget: big layers of {len(result['routed_layers'])} routed",
        ylabel="perplexity (held-out, log scale)",
        yscale="log",
        title=f"Duo routing oracles ({SPACE_NAMES[result['route_space']]} routes)",
    )
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.legend(fontsize=7)


def gain_panel(ax, result: dict) -> None:
    ks = [r["budget"] for r in result["per_budget"]]
    ax.plot(ks, [gain(r) for r in result["per_budget"]], "o-", label="this model")
    if result["control"]:
        control = [gain(r) for r in result["control"]["per_budget"]]
        ax.plot(ks, control, "o--", color="gray", label="control model")
    ax.set(xlabel="budget K", ylabel="oracle vs best fixed route: ppl gain (%)", title="oracle gain, and by chance")
    ax.legend(fontsize=7)
