"""Duo routing oracles against independent definitions: route spaces, prefix sharing == a forward pass per route
(also over the 3^L space, with the memory bound splitting the tree, and in models with duo FFNs in only some
layers), the random baseline == the best of explicitly drawn whole route assignments (and not the mean over routes,
which a per-token draw gives), per-budget statistics."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import arch
from arch.duo import BIG, ROUTE_NAMES, SKIP, SMALL
from arch.registry import ConfigError
from train.studies.duo.routes import route_losses, route_losses_naive, route_space, routed_layers
from train.studies.duo.summary import best_of_random, draw_assignments, summarise

LOW = {"small-big": (SMALL,), "skip-big": (SKIP,), "skip-small-big": (SKIP, SMALL)}


@pytest.mark.parametrize("space", list(LOW))
@pytest.mark.parametrize("budget", [None, 0, 2, 3])
def test_route_space_is_every_route_of_the_space_once(space, budget):
    routes = route_space(3, space, budget)
    choices = {*LOW[space], BIG}
    expect = [r for r in itertools.product(sorted(choices), repeat=3) if budget is None or r.count(BIG) == budget]
    assert sorted(map(tuple, routes.tolist())) == sorted(expect)
    n_low = len(LOW[space])
    assert len(routes) == ((n_low + 1) ** 3 if budget is None else math.comb(3, budget) * n_low ** (3 - budget))


def test_unknown_route_space_is_an_error_naming_the_allowed_ones():
    with pytest.raises(ConfigError, match="'skip-small' is not allowed; allowed: small-big, skip-big, skip-small-big"):
        route_space(3, "skip-small")


def tiny_lm(n_layers=4):
    torch.manual_seed(0)
    cfg = {"d_model": 32, "n_layers": n_layers, "n_heads": 2, "max_seq_len": 16, "ffn": {"type": "duo", "d_ff": 64}}
    return arch.build_model(cfg).eval()


BATCH = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(1))  # [B, T+1]


@pytest.mark.parametrize(
    "space, budget, max_states",
    [
        ("small-big", None, 512),
        ("small-big", 2, 512),
        ("skip-big", None, 512),
        ("skip-small-big", None, 512),
        ("skip-small-big", None, 5),  # the tree split into groups of prefixes (depth first)
        ("skip-small-big", None, 20),  # groups of several prefixes
        ("skip-small-big", 2, 10),
        ("skip-small-big", 1, 7),
        ("skip-small-big", None, 1),  # one route at a time below the split
    ],
)
def test_prefix_sharing_equals_a_forward_pass_per_route(space, budget, max_states):
    model = tiny_lm()
    routes = route_space(4, space, budget)
    tree = route_losses(model, BATCH, routes, chunk=3, max_states=max_states)  # several calls per level
    torch.testing.assert_close(tree, route_losses_naive(model, BATCH, routes), rtol=0, atol=1e-6)
    assert tree.shape == (len(routes), 3, 16)
    assert tree.std(0).mean() > 1e-3  # routes really differ


@pytest.mark.parametrize("max_states", [512, 5])
def test_each_distinct_prefix_runs_each_mixer_once(max_states):
    """Over the 3^4 space, layer j's mixer sees 3^j prefix states, each once, split into groups or not."""
    model = tiny_lm()
    seen = [0] * 4
    hooks = [
        b.mixer.register_forward_hook(lambda m, inp, out, j=j: seen.__setitem__(j, seen[j] + inp[0].shape[0]))
        for j, b in enumerate(model.blocks)
    ]
    route_losses(model, BATCH, route_space(4, "skip-small-big"), chunk=4, max_states=max_states)
    for h in hooks:
        h.remove()
    assert seen == [3 * 3**j for j in range(4)]  # B = 3 sequences per prefix


def brute_force_best_of(model, batch, routes: torch.Tensor, draws: torch.Tensor) -> float:
    """The definition: for each trial, run the model with its assignment forced (sequence s on route
    routes[draws[trial, s]], or routes[draws[trial, 0]] for every sequence) and take the mean token loss;
    keep the lowest."""
    ids, targets = batch[:, :-1], batch[:, 1:]
    best = math.inf
    for trial in draws.tolist():
        per_seq = [routes[trial[s if len(trial) > 1 else 0]] for s in range(len(ids))]  # [L] each
        forced = torch.stack(per_seq, 1)[:, :, None].expand(-1, -1, ids.shape[1])  # [L, B, T]
        with torch.no_grad():
            logits = model(ids, routes=forced)
        best = min(best, F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item())
    return best


@pytest.mark.parametrize("per", ["text", "sequence"])
def test_best_of_random_is_the_best_of_explicitly_drawn_whole_assignments(per):
    model = tiny_lm()
    routes = route_space(4, "skip-small-big", 2)  # 6 x 4 = 24 routes with 2 big layers
    draws = draw_assignments(len(routes), 3, per, 7, torch.Generator().manual_seed(3))
    assert draws.shape == (7, 1 if per == "text" else 3)
    best, trial = best_of_random(route_losses(model, BATCH, routes), draws)
    assert best == pytest.approx(brute_force_best_of(model, BATCH, routes, draws), abs=1e-5)
    assert best == pytest.approx(brute_force_best_of(model, BATCH, routes, draws[trial : trial + 1]), abs=1e-5)


def test_random_trials_are_uniform_over_the_budgets_routes():
    draws = draw_assignments(6, 4, "sequence", 6000, torch.Generator().manual_seed(0))  # [6000, 4]
    counts = torch.bincount(draws.flatten(), minlength=6).float()
    assert ((counts - 4000).abs() < 4 * math.sqrt(4000)).all()  # 24000 draws over 6 routes: 4000 +- 63 each
    assert (draws != draws[:, :1]).any(1).float().mean() > 0.9  # sequences of one trial draw their own routes
    with pytest.raises(ValueError, match="allowed text, sequence"):
        draw_assignments(6, 4, "token", 1, torch.Generator())


def per_token_best_of_100(losses: torch.Tensor, g: torch.Generator) -> float:
    """The previous definition: each trial draws an independent route for every token; best mean of 100."""
    flat = losses.flatten(1)  # [R, N]
    cols = torch.arange(flat.shape[1])
    return min(flat[torch.randint(len(flat), (flat.shape[1],), generator=g), cols].mean().item() for _ in range(100))


def test_whole_assignment_baseline_is_near_the_best_fixed_route_where_a_per_token_draw_gives_the_mean():
    """70 routes (C(8, 4)) whose mean losses are spread over [1, 2], with token noise of std 0.5: a per-token
    draw averages the routes away (its best of 100 is the mean over routes, 1.5), a whole-assignment draw keeps
    the best of ~56 distinct routes (within a few hundredths of the best fixed route, 1.0)."""
    g = torch.Generator().manual_seed(0)
    routes = route_space(8, "small-big", 4)  # [70, 8]
    level = torch.linspace(1, 2, 70)[torch.randperm(70, generator=g)]  # each route's mean loss
    losses = level[:, None, None] + 0.5 * torch.randn(70, 64, 64, generator=g)  # [R, S, T]
    fixed, mean = losses.mean((1, 2)).min().item(), losses.mean().item()
    assert per_token_best_of_100(losses, g) == pytest.approx(mean, abs=0.02)  # lands at the mean
    (row,) = summarise(losses, routes, [4])
    assert row["fixed_loss"] == pytest.approx(fixed) and row["mean_route_loss"] == pytest.approx(mean)
    assert row["random_loss"] - fixed < 0.05  # the old definition fails here: 0.5 above
    (per_seq,) = summarise(losses, routes, [4], per="sequence")
    assert fixed < per_seq["random_loss"] < mean - 0.03  # 64 sequences average less than 4096 tokens


def test_per_budget_statistics_match_their_definitions():
    routes = route_space(3, "skip-small-big")  # [27, 3]
    losses = torch.rand(27, 5, 10, generator=torch.Generator().manual_seed(0))  # [R, S, T]
    rows = summarise(losses, routes, [0, 1, 2, 3], n_draws=9)
    for k, row in enumerate(rows):
        ids = [i for i, r in enumerate(routes.tolist()) if r.count(BIG) == k]
        means = [losses[i].mean().item() for i in ids]
        assert row["n_routes"] == math.comb(3, k) * 2 ** (3 - k)
        assert row["fixed_loss"] == pytest.approx(min(means))
        assert routes[ids[means.index(min(means))]].tolist() == row["fixed_route"]
        assert row["mean_route_loss"] == pytest.approx(sum(means) / len(means))
        best = [min(ids, key=lambda i: losses[i, s, t].item()) for s in range(5) for t in range(10)]
        assert row["oracle_loss"] == pytest.approx(
            sum(losses[i, n // 10, n % 10].item() for n, i in enumerate(best)) / 50
        )
        big_use = [sum(routes[i, j].item() == BIG for i in best) / 50 for j in range(3)]
        assert row["oracle_big_fraction"] == pytest.approx(big_use)
        trials = torch.randint(len(ids), (9, 1), generator=torch.Generator().manual_seed(k))[:, 0].tolist()
        assert row["random_loss"] == pytest.approx(min(means[d] for d in trials))
        assert row["random_route"] == routes[ids[min(trials, key=lambda d: means[d])]].tolist()


def hybrid_lm(**ffn):
    """4 layers with duo FFNs in layers 1 and 3 only (plain SwiGLU MLPs, d_ff 48, in layers 0 and 2)."""
    torch.manual_seed(0)
    cfg = {
        "d_model": 32,
        "n_layers": 4,
        "n_heads": 2,
        "max_seq_len": 16,
        "ffn": {"type": "duo", "d_ff": 64, **ffn},
        "layers": {"0,2": {"ffn": {"type": "mlp", "d_ff": 48}}},
    }
    return arch.build_model(cfg).eval()


@pytest.mark.parametrize("space, max_states", [("small-big", 512), ("skip-small-big", 512), ("skip-small-big", 2)])
def test_layers_without_a_duo_ffn_run_as_they_are_on_every_route(space, max_states):
    """Routes cover the duo layers only; each route's losses equal those of the same weights built with the
    config's own fixed routing (``routing: fixed``, ``fixed_routes`` per layer) and run by the model's forward."""
    model = hybrid_lm()
    assert routed_layers(model) == [1, 3]
    routes = route_space(2, space)
    tree = route_losses(model, BATCH, routes, chunk=2, max_states=max_states)
    for r, losses in zip(routes.tolist(), tree):
        names = ["big", ROUTE_NAMES[r[0]], "big", ROUTE_NAMES[r[1]]]  # layers 0 and 2 are not duo: unused
        fixed = hybrid_lm(routing="fixed", fixed_routes=names)
        fixed.load_state_dict(model.state_dict())
        with torch.no_grad():
            logits = fixed(BATCH[:, :-1])  # [B, T, V]
        expect = F.cross_entropy(logits.flatten(0, 1), BATCH[:, 1:].flatten(), reduction="none").view(3, 16)
        torch.testing.assert_close(losses, expect, rtol=0, atol=1e-6)
    assert tree.std(0).mean() > 1e-3  # the duo layers' routes really differ
    with pytest.raises(ValueError, match="routes have 4 choices; the model has 2 routed layers"):
        route_losses(model, BATCH, route_space(4, space))


def test_oracle_refuses_layers_that_share_state_within_a_forward():
    """The route tree runs one layer at a time; DHSA layers sharing one chunking per forward cannot be split."""
    from train.studies.duo.oracle import check_request

    torch.manual_seed(0)
    cfg = {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16, "ffn": {"type": "duo", "d_ff": 64}}
    dhsa = {"type": "dhsa", "budget": 8, "query_block": 4, "n_init": 2, "n_recent": 4}
    check_request(arch.build_model({**cfg, "mixer": dhsa}), None, "small-big", None)  # own chunking per layer
    with pytest.raises(ConfigError, match="mixer.share_boundaries: the oracle's route tree runs one layer at a time"):
        check_request(arch.build_model({**cfg, "mixer": {**dhsa, "share_boundaries": True}}), None, "small-big", None)
