"""Duo-LLM training and the oracle command: deterministic random routing under resume, stage 3 (router) from a
stage-1 run with a frozen backbone, the oracle command's outputs with routers and a control (the statistics
themselves: test_oracle.py)."""

import csv
import json
import shutil

import pytest
import torch

from arch.registry import ConfigError
from train.checkpoint import load_trained
from train.cli import main
from train.fit import fit
from train.studies.duo.method import inv_temp_at
from train.studies.duo.oracle import load_routers

from ....conftest import CONFIGS, micro_overrides

DUO = str(CONFIGS / "lm/duo-tiny.yaml")
ROUTER = str(CONFIGS / "lm/duo-tiny-router.yaml")


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


@pytest.fixture(scope="module")
def router_run(stage1, tmp_path_factory, cache_dir):
    """A 4-step stage-3 run (routers only, budget 0.25) from ``stage1``."""
    tmp = tmp_path_factory.mktemp("duo3")
    over = duo_micro(tmp, cache_dir, **{"trainer.max_steps": 4, "optim.router_budget": 0.25})
    assert main(["fit", ROUTER, *over, "--init-from", str(stage1)]) == 0
    (run,) = (tmp / "runs" / "duo-tiny-router").iterdir()
    return run


def test_router_stage_from_stage1_trains_only_the_router(stage1, router_run):
    _, before = load_trained(stage1)
    _, after = load_trained(router_run)
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert changed and all(".ffn.router." in k for k in changed)  # frozen backbone: only routers moved
    rows = metrics(router_run)
    assert any(r.get("train/router_aux") for r in rows)
    betas = [float(r["duo/router_inv_temp"]) for r in rows if r.get("duo/router_inv_temp")]
    assert betas == sorted(betas) and betas[-1] > betas[0]  # annealed upward


def oracle_json(args: list[str], out) -> dict:
    assert main(["oracle", *args, "--batches", "1", "data.batch_size=2", "--out", str(out)]) == 0
    return json.loads((out / "oracle.json").read_text())


def test_oracle_with_routers_and_a_control(stage1, router_run, tmp_path, capsys):
    out = tmp_path / "oracle"
    result = oracle_json([str(stage1), "--routers", str(router_run), "--control", str(stage1)], out)
    printed = capsys.readouterr().out
    assert "| big layers K | routes | best fixed (route) | mean of routes | best of 100 random (route) |" in printed
    assert "most difficult tokens: loss(all-small) - loss(oracle over all 4 small/big routes)" in printed
    assert [r["budget"] for r in result["per_budget"]] == [0, 1, 2]
    k0, k2 = result["per_budget"][0], result["per_budget"][2]  # one route each: every statistic is that route
    assert k0["oracle_ppl"] == pytest.approx(result["all_small_ppl"], rel=1e-5)  # tree vs a plain forward pass
    assert k2["fixed_ppl"] == pytest.approx(result["all_big_ppl"], rel=1e-5)
    assert k2["random_ppl"] == k2["mean_route_ppl"] == k2["fixed_ppl"] == k2["oracle_ppl"]
    # the model as its own control: the control's statistics are the model's, exactly
    control = result["control"]["per_budget"]
    assert [(r["fixed_loss"], r["oracle_loss"], r["random_loss"]) for r in control] == [
        (r["fixed_loss"], r["oracle_loss"], r["random_loss"]) for r in result["per_budget"]
    ]
    (router,) = result["routers"]
    assert router["budget"] == 0.25 and router["run"] == str(router_run)
    assert router["mean_big_layers"] == pytest.approx(sum(f[2] for f in router["route_fraction"]))
    assert "| router (optim.router_budget) |" in printed and "| 0.25 |" in printed
    assert len(result["difficult_tokens"]) == 12 and "[[" in result["difficult_tokens"][0]["in_context"]
    assert (out / "ppl_vs_budget.png").stat().st_size > 0 and (out / "oracle_big_heatmap.png").stat().st_size > 0


def test_oracle_in_the_skip_spaces_leaves_small_big_routers_out(router_run, tmp_path, capsys):
    result = oracle_json([str(router_run), "--space", "skip-big"], tmp_path / "a")
    assert result["routers"] == [] and result["routers_left_out"] == [f"{router_run} (routes over small-big)"]
    assert "router left out (not trained in the skip/big space)" in capsys.readouterr().out
    assert result["difficulty_reference"] == "all-skip"
    result = oracle_json([str(router_run), "--space", "skip-small-big", "--random-per", "sequence"], tmp_path / "b")
    assert [r["n_routes"] for r in result["per_budget"]] == [4, 4, 1] and result["n_routes"] == 9
    assert result["difficulty_reference"] == "all-small" and result["routers"] == []
    assert result["per_budget"][1]["random_route"] is None  # one route per sequence: no single route to show


def test_oracle_control_only_in_the_small_big_space(stage1, capsys):
    assert main(["oracle", str(stage1), "--space", "skip-big", "--control", str(stage1)]) == 2
    assert "a control needs --space small-big" in capsys.readouterr().err


def test_routers_must_share_the_checkpoints_weights_outside_the_routers(stage1, router_run):
    cfg, model = load_trained(stage1)
    assert len(load_routers(str(stage1), model, cfg, [str(router_run)], "cpu")) == 1
    with torch.no_grad():
        model.blocks[1].norm2.weight.add_(1e-3)
    with pytest.raises(ConfigError, match=r"weights differ from .* outside the routers \(first: blocks.1.norm2"):
        load_routers(str(stage1), model, cfg, [str(router_run)], "cpu")
    with pytest.raises(
        ConfigError, match=r"not a duo model with a router in every routed layer of .* \(layers \[0, 1\]"
    ):
        load_routers(str(stage1), model, cfg, [str(stage1)], "cpu")


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
    assert "--budget 3: must be between 0 and the number of routed (duo) layers, 2" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory, cache_dir):
    """A 2-step duo run of 3 layers whose layer 1 has a plain MLP instead of a duo FFN."""
    tmp = tmp_path_factory.mktemp("hybrid")
    over = {"model.n_layers": 3, "model.layers.1.ffn.type": "mlp", "trainer.max_steps": 2, "trainer.val_every": 2}
    return fit(DUO, duo_micro(tmp, cache_dir, **over, **{"trainer.ckpt_every": 2}))["run_dir"]


def test_oracle_skips_layers_without_a_duo_ffn_and_says_so(hybrid_run, tmp_path, capsys):
    result = oracle_json([str(hybrid_run), "--space", "skip-small-big"], tmp_path / "o")
    printed = capsys.readouterr().out
    assert "routes cover the 2 layers with a duo FFN: [0, 2]; layers without one are skipped by the routing" in printed
    assert "run as they are on every route: 1 (MLP)" in printed
    assert result["routed_layers"] == [0, 2] and result["n_routes"] == 9  # 3^2 routes over the 2 duo layers
    assert [r["budget"] for r in result["per_budget"]] == [0, 1, 2]
    assert len(result["per_budget"][1]["oracle_big_fraction"]) == 2
    assert "routes: one letter per routed layer (layers [0, 2])" in printed
    k2 = result["per_budget"][2]  # one route (big, big): every statistic is that route's, as a plain pass gives
    assert k2["fixed_ppl"] == k2["oracle_ppl"] == pytest.approx(result["all_big_ppl"], rel=1e-5)


def test_oracle_refuses_a_model_without_duo_ffns(tmp_path, cache_dir, capsys):
    over = {"model.ffn.type": "mlp", "trainer.max_steps": 1, "trainer.val_every": 1, "trainer.ckpt_every": 1}
    run = fit(DUO, duo_micro(tmp_path, cache_dir, **over))["run_dir"]
    assert main(["oracle", str(run)]) == 2
    assert "the oracle needs a duo FFN (ffn: {type: duo}) in at least one layer; none has" in capsys.readouterr().err
