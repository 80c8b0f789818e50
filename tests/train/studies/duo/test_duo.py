"""Duo-LLM training and oracles: prefix sharing == naive passes, oracle statistics, deterministic random routing
under resume, stage 3 (router) from a stage-1 run with a frozen backbone, the oracle command's outputs."""

import csv
import json
import math
import shutil

import pytest
import torch

import arch
from arch.duo import BIG, SKIP, SMALL
from train.checkpoint import load_trained
from train.cli import main
from train.fit import fit
from train.studies.duo.method import inv_temp_at
from train.studies.duo.oracle import route_losses, route_losses_naive, route_space, summarise

from ....conftest import CONFIGS, micro_overrides

DUO = str(CONFIGS / "lm/duo-tiny.yaml")
ROUTER = str(CONFIGS / "lm/duo-tiny-router.yaml")


@pytest.mark.parametrize("low, budget", [(SMALL, None), (SMALL, 2), (SKIP, None)])
def test_prefix_sharing_oracle_equals_naive_per_route_passes(low, budget):
    torch.manual_seed(0)
    model = arch.build_model(
        {"d_model": 32, "n_layers": 4, "n_heads": 2, "max_seq_len": 16, "ffn": {"type": "duo", "d_ff": 64}}
    ).eval()
    batch = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(1))
    routes = route_space(4, low, budget)
    assert len(routes) == (6 if budget == 2 else 16) and set(routes.unique().tolist()) == {low, BIG}
    tree = route_losses(model, batch, routes, chunk=3)  # chunk smaller than a level: several calls per level
    torch.testing.assert_close(tree, route_losses_naive(model, batch, routes), rtol=0, atol=1e-6)
    assert tree.shape == (len(routes), 3, 16)
    assert tree.std(0).mean() > 1e-3  # routes really differ


def test_oracle_statistics_match_their_definitions():
    routes = route_space(3)  # [8, 3]
    losses = torch.rand(8, 50, generator=torch.Generator().manual_seed(0))  # [R, N]
    rows = summarise(losses, routes, [0, 1, 2, 3])
    for k, row in enumerate(rows):
        ids = [i for i, r in enumerate(routes.tolist()) if r.count(BIG) == k]
        assert row["n_routes"] == math.comb(3, k)
        assert row["fixed_loss"] == pytest.approx(min(losses[i].mean().item() for i in ids))
        per_token_best = [min(losses[i, t].item() for i in ids) for t in range(50)]
        assert row["oracle_loss"] == pytest.approx(sum(per_token_best) / 50)
        assert row["oracle_loss"] <= row["random100_loss"] + 1e-6
        assert row["oracle_loss"] <= row["fixed_loss"] + 1e-6
        assert sum(row["oracle_big_fraction"]) == pytest.approx(k)  # every oracle route has exactly k big layers


def test_inverse_temperature_is_annealed_upward():
    optim = {"router_inv_temp": [1.0, 16.0]}
    assert [inv_temp_at(s, optim, 100) for s in (0, 50, 100, 200)] == pytest.approx([1.0, 4.0, 16.0, 16.0])


def metrics(run_dir) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def losses_of(run_dir) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in metrics(run_dir) if r.get("train/loss")}


def duo_micro(tmp, cache_dir, **extra):
    return micro_overrides(tmp, cache_dir, **{"model.ffn.d_ff": 64, "trainer.keep_checkpoints": -1, **extra})


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, cache_dir):
    """A 6-step duo run (random routing) with checkpoints at steps 3 and 6."""
    return fit(DUO, duo_micro(tmp_path_factory.mktemp("duo1"), cache_dir))["run_dir"]


def test_random_routing_same_seed_same_curve_and_resume_gives_same_curve(stage1, tmp_path, cache_dir):
    ref = losses_of(stage1)
    assert len(ref) == 6
    rows = metrics(stage1)
    fractions = [float(r["duo/layer1/big"]) for r in rows if r.get("duo/layer1/big")]
    assert fractions and all(0.3 < f < 0.7 for f in fractions)  # p_big = 0.5, logged per layer
    assert losses_of(fit(DUO, duo_micro(tmp_path / "again", cache_dir))["run_dir"]) == ref
    loose = tmp_path / "step-000003.ckpt"  # outside a run directory: the resumed run gets a new one
    shutil.copy(stage1 / "checkpoints" / "step-000003.ckpt", loose)
    resumed = fit(DUO, duo_micro(tmp_path, cache_dir), resume=str(loose))["run_dir"]
    assert losses_of(resumed) == {s: ref[s] for s in range(3, 6)}


def test_router_stage_from_stage1_trains_only_the_router_then_oracle(stage1, tmp_path, cache_dir, capsys):
    over = duo_micro(tmp_path, cache_dir, **{"trainer.max_steps": 4})
    assert main(["fit", ROUTER, *over, "--init-from", str(stage1)]) == 0
    assert f"weights initialised from {stage1}" in capsys.readouterr().out
    (run,) = (tmp_path / "runs" / "duo-tiny-router").iterdir()
    _, before = load_trained(stage1)
    _, after = load_trained(run)
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert changed and all(".ffn.router." in k for k in changed)  # frozen backbone: only routers moved
    rows = metrics(run)
    assert any(r.get("train/router_aux") for r in rows)
    betas = [float(r["duo/router_inv_temp"]) for r in rows if r.get("duo/router_inv_temp")]
    assert betas == sorted(betas) and betas[-1] > betas[0]  # annealed upward

    out = tmp_path / "oracle"
    assert main(["oracle", str(run), "--batches", "1", "data.batch_size=2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| big layers K |" in printed and "most difficult tokens" in printed and "router: ppl" in printed
    result = json.loads((out / "oracle.json").read_text())
    assert [r["budget"] for r in result["per_budget"]] == [0, 1, 2] and result["router"] is not None
    k0, k2 = result["per_budget"][0], result["per_budget"][2]
    assert k0["oracle_ppl"] == pytest.approx(result["all_small_ppl"], rel=1e-5)
    assert k2["fixed_ppl"] == pytest.approx(result["all_big_ppl"], rel=1e-5)
    assert len(result["difficult_tokens"]) == 12 and "[[" in result["difficult_tokens"][0]["in_context"]
    assert (out / "ppl_vs_budget.png").stat().st_size > 0 and (out / "oracle_big_heatmap.png").stat().st_size > 0


def test_init_from_a_model_of_another_shape_takes_the_sources_model(stage1, tmp_path, cache_dir, capsys):
    over = duo_micro(tmp_path, cache_dir, **{"model.ffn.d_ff": 128, "trainer.max_steps": 1})
    assert main(["fit", DUO, *over, "--init-from", str(stage1)]) == 0
    assert "model section taken from" in capsys.readouterr().out
    (run,) = (tmp_path / "runs" / "duo-tiny").iterdir()
    assert load_trained(run)[0]["model"] == load_trained(stage1)[0]["model"]
    assert main(["fit", DUO, *over, "--init-from", str(stage1), "--resume", str(stage1)]) == 2


def test_paper_config_has_the_papers_shape_and_about_1_4b_parameters(capsys):
    assert main(["info", str(CONFIGS / "paper/duo-paper.yaml"), "data.seq_len=64"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 1,399," in out  # 12 x (attention 26.2M + big 78.6M + small 4.9M) + 81.9M embedding
    assert "duo d_ff=10240,small_ratio=16" in out and "an upper bound" in out


def test_oracle_rejects_a_budget_beyond_the_depth(stage1, capsys):
    assert main(["oracle", str(stage1), "--budget", "3"]) == 2  # the micro model has 2 layers
    assert "--budget 3: must be between 0 and the number of layers, 2" in capsys.readouterr().err
