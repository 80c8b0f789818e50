"""Per-budget statistics of per-route token losses: best fixed route, random baseline, oracle (arXiv 2410.10846).

Given ℓ_t(r) for every route r with exactly K big layers (``losses`` [R, S, T]: routes, sequences, positions):

* fixed     = min_r mean_t ℓ_t(r)                the best single route for every token
* mean      = mean_r mean_t ℓ_t(r)               what one random route gives on average
* random    = best of 100 random trials           a trial is a whole route assignment: one route drawn uniformly
              among the routes with K big layers (a uniformly random set of K big layers; in the skip/small/big
              space each other layer is skip or small with probability 1/2) and used for every token of the
              text (``per="text"``), or one such route drawn for each sequence (``per="sequence"``); the trial's
              score is its mean token loss, and the lowest of the 100 is kept
* oracle    = mean_t min_r ℓ_t(r)                each token takes its own best route

(An independent route per *token* per trial, averaged over thousands of tokens, is the mean over routes whatever
the draw: its best of 100 is not a best-of; ``tests/train/studies/duo`` shows it on synthetic losses.)
"""

from __future__ import annotations

import torch

from arch.duo import BIG

RANDOM_PER = ("text", "sequence")


def draw_assignments(n_routes: int, n_seqs: int, per: str, n_draws: int, generator: torch.Generator):
    """Random trials as route indices [n_draws, G] into the budget's ``n_routes`` routes, uniform: G = 1 (one
    route for the whole text) or G = ``n_seqs`` (one route per sequence)."""
    if per not in RANDOM_PER:
        raise ValueError(f"random trials per {per!r}: allowed {', '.join(RANDOM_PER)}")
    return torch.randint(n_routes, (n_draws, 1 if per == "text" else n_seqs), generator=generator)


def best_of_random(losses: torch.Tensor, draws: torch.Tensor) -> tuple[float, int]:
    """(lowest mean token loss, its trial index) over the trials ``draws`` [n, G] (G = 1 or S) on ``losses``
    [R, S, T]: trial i gives sequence s the route ``draws[i, s]`` (or ``draws[i, 0]`` for every s)."""
    seq_means = losses.mean(2)  # [R, S]; every sequence has T tokens, so a trial's mean is the mean of these
    S = seq_means.shape[1]
    trial = seq_means[draws.expand(-1, S), torch.arange(S)].mean(1)  # [n]
    return trial.min().item(), int(trial.argmin())


def summarise(
    losses: torch.Tensor, routes: torch.Tensor, budgets: list[int], per: str = "text", n_draws: int = 100
) -> list[dict]:
    """Per budget K: the statistics above over the routes with K big layers (``losses`` [R, S, T], ``routes``
    [R, L]), the best fixed route, and how often the oracle's route uses the big module in each layer. Trials
    of budget K draw from ``torch.Generator().manual_seed(K)``."""
    rows = []
    n_big = (routes == BIG).sum(1)  # [R]
    for k in budgets:
        sel = (n_big == k).nonzero().squeeze(1)
        lk = losses[sel]  # [R_k, S, T]
        mean = lk.mean((1, 2))  # [R_k]
        best_per_token = lk.argmin(0)  # [S, T]
        draws = draw_assignments(len(sel), lk.shape[1], per, n_draws, torch.Generator().manual_seed(k))
        random_loss, best_trial = best_of_random(lk, draws)
        rows.append(
            {
                "budget": k,
                "n_routes": len(sel),
                "fixed_loss": mean.min().item(),
                "fixed_route": routes[sel[mean.argmin()]].tolist(),
                "mean_route_loss": mean.mean().item(),
                "random_loss": random_loss,
                "random_route": routes[sel[draws[best_trial, 0]]].tolist() if per == "text" else None,
                "oracle_loss": lk.min(0).values.mean().item(),
                "oracle_big_fraction": (routes[sel][best_per_token] == BIG).float().mean((0, 1)).tolist(),  # [L]
            }
        )
    return rows
