"""Measured FLOPs per token (``train.info.measured_flops_per_token``) against the config's upper bound and against
FLOP counts written from each block's definition: dense = the bound, Duo in proportion to the routes taken, a
sparse mixer in proportion to its budget."""

import re

import pytest
import torch

import arch
from arch.duo import DuoFFN
from train.cli import main
from train.info import forward_flops_per_token, measured_flops_per_token

from ..conftest import CONFIGS, micro_overrides

D, L, T, V = 32, 2, 64, 256


def micro(**blocks) -> dict:
    return {"d_model": D, "n_layers": L, "n_heads": 2, "max_seq_len": T, "vocab_size": V, **blocks}


def batches(n: int = 2, b: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, V, (b, T + 1), generator=g) for _ in range(n)]


def measure(cfg: dict, train: bool = False, data=None) -> float:
    torch.manual_seed(0)
    return measured_flops_per_token(arch.build_model(cfg), data or batches(), train=train)


def test_dense_model_executes_its_upper_bound():
    cfg = micro(ffn={"type": "mlp", "activation": "swiglu", "d_ff": 96})
    per_layer = 2 * 4 * D * D + 2 * 3 * D * 96 + 2 * 2 * T * D  # projections, SwiGLU, q·kᵀ and p·v over T×T
    assert measure(cfg) == forward_flops_per_token(cfg) == L * per_layer + 2 * D * V
    # a Pattention projection counts its token count: 2 matmuls of n tokens per projection
    tf = micro(proj={"type": "pattention", "qkv_tokens": 48, "proj_tokens": 40})
    assert measure(tf) == forward_flops_per_token(tf)
    assert measure(tf) - measure(micro()) == L * (3 * 2 * 2 * 48 * D + 2 * 2 * 40 * D - 2 * 4 * D * D)


@pytest.mark.parametrize("p_big", [0.25, 0.5])
def test_duo_counts_the_routes_taken(p_big):
    d_ff, ratio = 128, 16
    cfg = micro(ffn={"type": "duo", "d_ff": d_ff, "small_ratio": ratio, "p_big": p_big})
    all_big = micro(ffn={"type": "duo", "d_ff": d_ff, "small_ratio": ratio, "p_big": 1.0})
    upper = forward_flops_per_token(cfg)
    assert measure(all_big) == upper  # every token big: the bound is reached
    torch.manual_seed(0)
    model = arch.build_model(cfg)
    data = batches(n=1, b=4)
    got = measured_flops_per_token(model, data)
    big, small = 2 * 3 * D * d_ff, 2 * 3 * D * d_ff // ratio  # SwiGLU FLOPs per token of each module
    fractions = [m.route_fraction for m in model.modules() if isinstance(m, DuoFFN)]  # [skip, small, big] per layer
    assert got == pytest.approx(upper - sum((1 - float(f[2])) * (big - small) for f in fractions), rel=1e-12)
    assert all(abs(float(f[2]) - p_big) < 0.1 for f in fractions)  # the routes follow p_big
    assert got / upper < 1 - 0.5 * (1 - p_big) * (big - small) * L / upper


def test_sparse_mixer_scales_with_its_budget():
    qb = 8
    dhsa = lambda b: micro(  # noqa: E731  fixed chunks: the paper's block-sparse baseline
        mixer={
            "type": "dhsa",
            "chunker": "fixed",
            "chunk_size": 8,
            "budget": b,
            "query_block": qb,
            "n_init": 4,
            "n_recent": 8,
        }
    )
    dense = measure(micro())
    data = batches()
    flops = {b: measure(dhsa(b), data=data) for b in (16, 32, 48)}
    # query block i attends its own qb keys and min(budget, i·qb) earlier ones (q·kᵀ and p·v: 4·d FLOPs per key;
    # the core computes no unused slot) instead of T (dense SDPA is counted in full, causal or not); the selection
    # scores Q_c·K_cᵀ of every query block against every chunk (head dim hd) add 2·hd·n_chunks·n_blocks
    select = 2 * (D // 2) * (T // 8) * (T // qb) / T
    keys = lambda b: sum(min(b, i * qb) + qb for i in range(T // qb)) / (T // qb)  # noqa: E731  per query
    for b, f in flops.items():
        assert f == dense - L * 4 * D * (T - keys(b)) + L * select
    assert flops[16] < flops[32] < flops[48] < dense
    trained = {b: measure(dhsa(b), train=True, data=data) for b in (16, 48)}
    assert trained[16] < trained[48] < measure(micro(), train=True, data=data)
    # budget >= the context: every causal key, i.e. half of dense's full count plus the diagonal blocks
    assert measure(dhsa(T), data=data) == dense - L * 4 * D * (T - keys(T)) + L * select


def test_info_measure_prints_both_counts(tmp_path, cache_dir, capsys):
    over = micro_overrides(tmp_path, cache_dir)
    assert main(["info", str(CONFIGS / "lm/duo-tiny.yaml"), *over, "--measure", "4"]) == 0
    out = capsys.readouterr().out
    upper = float(re.search(r"upper bound\): forward ([\d.]+) MFLOP", out).group(1))
    got = float(re.search(r"forward ([\d.]+) MFLOP/token \(([\d.]+)% of the upper bound", out).group(1))
    assert 0 < got < upper
