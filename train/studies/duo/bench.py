"""Does compute follow the route? Registered benchmarks ``duo-ffn`` and ``duo-oracle``.

* ``duo-ffn``: one ``DuoFFN`` layer (big = 4d SwiGLU, small = big / 16), forward + backward, with exactly 25, 50
  and 75 % of the tokens forced BIG and the rest SMALL, against all-big (and all-small).
* ``duo-oracle``: the routing oracle at L layers over the full 2^L small/big route space: the prefix-sharing
  route tree (``routes.route_losses``) against one full forward pass per route (``routes.route_losses_naive``).
  (Both give the same per-token losses: ``tests/train/studies/duo`` checks it.)

    python -m train bench duo-ffn duo-oracle [--size d_model=512,tokens=4096] [--threads 1]
"""

from __future__ import annotations

import torch

import arch
from arch.config import LayerContext
from arch.duo import BIG, SMALL, DuoFFN
from kernels.bench.registry import Benchmark, register

from .routes import route_losses, route_losses_naive, route_space

FRACTIONS = {"all small": 0.0, "25% big": 0.25, "50% big": 0.5, "75% big": 0.75, "all big": 1.0}


def setup_ffn(size: dict, impl: str, mode: str, device: str, dtype: torch.dtype):
    d, n = size["d_model"], size["tokens"]
    torch.manual_seed(0)
    layer = DuoFFN(LayerContext.for_block(d_model=d, n_heads=1), d_ff=4 * d, small_ratio=16).to(device, dtype)
    x = torch.randn(1, n, d, device=device, dtype=dtype, requires_grad=True)  # [B, T, D]
    route = torch.full((1, n), SMALL, device=device)
    picked = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: round(FRACTIONS[impl] * n)]
    route[0, picked.to(device)] = BIG
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]
    return lambda: torch.autograd.grad(layer(x, route=route).sum(), params, allow_unused=True)


def setup_oracle(size: dict, impl: str, mode: str, device: str, dtype: torch.dtype):
    L, d, T = size["layers"], size["d_model"], size["seq_len"]
    torch.manual_seed(0)
    cfg = {"d_model": d, "n_layers": L, "n_heads": 4, "max_seq_len": T, "ffn": {"type": "duo", "d_ff": 4 * d}}
    model = arch.build_model(cfg).to(device, dtype).eval()
    ids = torch.randint(0, 256, (size["batch"], T + 1), generator=torch.Generator().manual_seed(0)).to(device)
    routes = route_space(L)
    fn = route_losses if impl == "prefix tree" else route_losses_naive
    return lambda: fn(model, ids, routes)


register(
    Benchmark(
        name="duo-ffn",
        description="one DuoFFN layer, forward + backward, with a fraction of the tokens routed big",
        setup=setup_ffn,
        sizes=lambda device: [{"d_model": 512, "tokens": 4096}],
        impls=tuple(FRACTIONS),
        baselines=("all big",),
        modes=("fwd+bwd",),
    )
)
register(
    Benchmark(
        name="duo-oracle",
        description="routing oracle over all 2^L small/big routes: prefix-sharing tree vs a pass per route",
        setup=setup_oracle,
        sizes=lambda device: [{"layers": 8, "d_model": 128, "batch": 2, "seq_len": 128}],
        impls=("prefix tree", "naive"),
        baselines=("naive",),
        modes=("all routes",),
        dtype=lambda device: "float32",
    )
)
