"""Route spaces of a Duo model and the per-token loss of every route in one (Duo-LLM, arXiv 2410.10846, Sec. 4).

A route gives every layer one FFN choice (``arch.duo``: SKIP=0, SMALL=1, BIG=2), the same for every token. A route
space is the set of routes whose choices come from one of

* ``small-big``       — 2^L routes (the paper's main space),
* ``skip-big``        — 2^L routes,
* ``skip-small-big``  — 3^L routes (6561 at L = 8),

optionally only those with exactly K big layers (the budget counts big layers whatever the other layers do).
A route covers the *routed* layers, those whose FFN is a ``DuoFFN`` (``routed_layers``): in a model with duo FFNs
in only some layers (``layers:`` overrides, hybrid configs) the other layers run as they are on every route.

``route_losses`` evaluates ℓ_t(r), the loss of token t when the whole sequence runs on route r, for every route of
a space by prefix sharing: the hidden state after layer j depends only on the routes of layers <= j, so the route
tree is evaluated level by level; each distinct prefix runs layer j's mixer once, and each child extends it with
one FFN choice, batched over prefixes. At L = 8 the small/big space runs 255 mixers and 510 FFNs instead of 2048
of each; the skip/small/big space 3280 mixers and 9840 FFNs (a third of them skips) instead of 52488 of each.
Memory is bounded by ``max_states`` hidden states: where a level would hold more, the prefixes are split into
groups whose subtrees are evaluated one after the other (depth first). ``route_losses_naive`` (one full forward
pass per route, ``forward_on_route``) is the definition the tests and ``python -m train bench duo-oracle`` compare
it with.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

from arch.duo import BIG, SKIP, SMALL, DuoFFN
from arch.registry import ConfigError

SPACES = {"small-big": (SMALL, BIG), "skip-big": (SKIP, BIG), "skip-small-big": (SKIP, SMALL, BIG)}


def route_space(n_layers: int, space: str = "small-big", budget: Optional[int] = None) -> torch.Tensor:
    """Every route of ``space`` (one of ``SPACES``), or only those with exactly ``budget`` big layers:
    LongTensor [R, n_layers], in lexicographic order (layer 0 most significant)."""
    if space not in SPACES:
        raise ConfigError(f"route space {space!r} is not allowed; allowed: {', '.join(SPACES)}")
    routes = torch.tensor(list(itertools.product(SPACES[space], repeat=n_layers)), dtype=torch.long)
    if budget is not None:
        routes = routes[(routes == BIG).sum(1) == budget]
    return routes


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # [..., T, V], [..., T] -> [..., T]
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="none").view(targets.shape)


def _chunked(fn: Callable, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn over x[i : i + chunk] along dim 0 (prefixes), concatenated: bounds the memory of one call."""
    return torch.cat([fn(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def routed_layers(model) -> list[int]:
    """Indices of the layers whose FFN is routed (a ``DuoFFN``): a route has one choice for each, in this order."""
    return [j for j, block in enumerate(model.blocks) if isinstance(block.ffn, DuoFFN)]


def forward_on_route(model, ids: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of ``ids`` [B, T] with every token on ``route`` [D] (one choice per routed layer); the
    layers without a duo FFN run as they are."""
    choices = iter(route.tolist())
    x = model.tok_emb(ids)  # [B, T, D]
    for block in model.blocks:
        routed = isinstance(block.ffn, DuoFFN)
        x = block(x, route=torch.full(ids.shape, next(choices), device=ids.device)) if routed else block(x)
    return model.head(model.norm_f(x))


@torch.no_grad()
def route_losses_naive(model, batch: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
    """ℓ_t(r) by one full forward pass per route: [R, B, T] for a [B, T+1] batch and routes [R, D]."""
    ids, targets = batch[:, :-1], batch[:, 1:]
    return torch.stack([token_losses(forward_on_route(model, ids, r), targets) for r in routes])


@dataclasses.dataclass
class _Tree:
    """What every level of the route tree needs: the model, the targets [B, T], for each layer the column of the
    routes that it takes (None: not routed), and the batching and memory bounds."""

    model: object
    targets: torch.Tensor
    column: list[Optional[int]]
    chunk: int
    max_states: int


@torch.no_grad()
def route_losses(model, batch: torch.Tensor, routes: torch.Tensor, chunk: int = 16, max_states: int = 512):
    """ℓ_t(r) for every route, by prefix sharing: [R, B, T] for a [B, T+1] batch and routes [R, D] (distinct; D
    routed layers).

    ``chunk`` prefixes go through a module at a time; at most about ``max_states`` hidden states [B, T, D] are
    held at once (a level that would hold more is split into groups of prefixes, evaluated one after another).
    """
    if max_states < 1:
        raise ValueError(f"max_states must be >= 1, got {max_states}")
    layers = routed_layers(model)
    if routes.shape[1] != len(layers):
        raise ValueError(f"routes have {routes.shape[1]} choices; the model has {len(layers)} routed layers")
    column = [layers.index(j) if j in layers else None for j in range(len(model.blocks))]
    tree = _Tree(model, batch[:, 1:], column, chunk, max_states)
    routes = routes.to(batch.device)
    states = model.tok_emb(batch[:, :-1])[None]  # [1, B, T, D]: the empty prefix
    parent = torch.zeros(len(routes), dtype=torch.long, device=batch.device)  # [R]: each route's prefix in `states`
    return _descend(tree, states, parent, routes, 0)


def _descend(tree: _Tree, states, parent, routes, j: int) -> torch.Tensor:
    """Losses [R, B, T] of ``routes`` [R, D] whose first j layers are done: route i's hidden state after them is
    ``states[parent[i]]`` ([P, B, T, D] holds one state per distinct prefix of length j)."""
    model, targets = tree.model, tree.targets
    if j == len(model.blocks):
        B, T = targets.shape
        head = lambda s: token_losses(model.head(model.norm_f(s)), targets.expand(len(s), B, T))  # noqa: E731
        return _chunked(head, states, tree.chunk)[parent]  # [R, B, T]
    if len(routes) > tree.max_states and len(states) > 1:  # too many leaves below: one group of prefixes at a time
        out = states.new_empty(len(routes), *targets.shape)
        for group in _prefix_groups(parent, len(states), tree.max_states):
            sel = torch.isin(parent, group).nonzero().squeeze(1)  # the routes below this group
            renumber = torch.empty(len(states), dtype=torch.long, device=parent.device)
            renumber[group] = torch.arange(len(group), device=parent.device)
            out[sel] = _descend(tree, states[group], renumber[parent[sel]], routes[sel], j)
        return out
    block, col = model.blocks[j], tree.column[j]
    if col is None:  # not routed: every prefix through the whole block, no branching
        states = _chunked(lambda s: block(s.flatten(0, 1)).view_as(s), states, tree.chunk)
    else:
        states, parent = _extend(block, states, parent, routes[:, col], tree.chunk)
    return _descend(tree, states, parent, routes, j + 1)


def _prefix_groups(parent: torch.Tensor, n_prefixes: int, max_routes: int) -> list[torch.Tensor]:
    """Consecutive groups of prefix indices, each with at most ``max_routes`` routes below it (or one prefix)."""
    counts = torch.bincount(parent, minlength=n_prefixes).tolist()
    groups, current, size = [], [], 0
    for p, c in enumerate(counts):
        if current and size + c > max_routes:
            groups.append(current)
            current, size = [], 0
        current.append(p)
        size += c
    groups.append(current)
    return [torch.tensor(g, dtype=torch.long, device=parent.device) for g in groups]


def _extend(block, states: torch.Tensor, parent: torch.Tensor, choice_of_route: torch.Tensor, chunk: int):
    """One level of the route tree: every prefix state [P, B, T, D] through ``block``'s mixer once, then each
    distinct child (prefix, FFN choice) -> (child states [P', B, T, D], each route's child index [R])."""
    _, B, T, _ = states.shape
    mid = _chunked(lambda s: block.attend(s.flatten(0, 1)).view_as(s), states, chunk)  # [P, B, T, D]
    children, child_of_route = torch.unique(torch.stack([parent, choice_of_route], 1), dim=0, return_inverse=True)
    new_states = mid.new_empty(len(children), *mid.shape[1:])  # [P', B, T, D]
    for choice in children[:, 1].unique().tolist():
        sel = (children[:, 1] == choice).nonzero().squeeze(1)  # children taking `choice` at this layer

        def ffn(s: torch.Tensor, choice=choice) -> torch.Tensor:  # [n, B, T, D], every token on `choice`
            route = torch.full((s.shape[0] * B, T), choice, device=s.device)  # [n*B, T]
            return block.feed_forward(s.flatten(0, 1), route=route).view_as(s)

        new_states[sel] = _chunked(ffn, mid[children[sel, 0]], chunk)
    return new_states, child_of_route
