"""configs/lm/hybrid-tiny.yaml, every mechanism in one model by per-layer overrides: it holds dense, causal BRA,
DHSA, Pattention projections and routed Duo FFNs; it is causal in training and inference mode; it decodes with
the cache exactly; it trains, grows exactly on its Pattention layers, and runs the Duo oracle and sampling."""

import json
import math
import re

import pytest
import torch

import arch
from arch.bra import CausalBRA
from arch.dhsa import DHSA
from arch.duo import DuoFFN
from arch.pattention import Pattention
from train.checkpoint import load_trained
from train.cli import main
from train.config import load_config
from train.fit import fit
from train.generate import _prefill_cache, generate

from ....conftest import CONFIGS, assert_causal, micro_overrides

HYBRID = str(CONFIGS / "lm/hybrid-tiny.yaml")
# the hybrid's layer plan at test size: T 64, regions of 8, DHSA budget 16 keys, 16 parameter tokens
SMALL = {
    "model.n_layers": 4,
    "model.max_seq_len": 64,
    "model.ffn.d_ff": 64,
    "data.batch_size": 2,
    "model.layers.1.mixer.region_size": 8,
    "model.layers.1.mixer.topk": 2,
    "model.layers.2.mixer": json.dumps(
        {"budget": 16, "query_block": 8, "n_init": 4, "n_recent": 8, "max_chunk": 8, "window": 2, "nms_radius": 2}
    ),
    "model.layers.1.proj.qkv_tokens": 16,
    "model.layers.1.proj.proj_tokens": 16,
    "model.layers.2.proj.qkv_tokens": 16,
    "model.layers.2.proj.proj_tokens": 16,
}


def small_model() -> torch.nn.Module:
    cfg = load_config(HYBRID, [f"{k}={v}" for k, v in SMALL.items()] + ["model.d_model=32", "model.n_heads=2"])
    torch.manual_seed(0)
    model = arch.build_model(cfg["model"])
    for m in model.modules():  # a trained-looking router: not every token on the same route
        if isinstance(m, DuoFFN):
            torch.nn.init.normal_(m.router.weight, std=1.0)
    return model


def test_hybrid_config_holds_every_mechanism():
    with torch.device("meta"):
        model = arch.build_model(load_config(HYBRID)["model"])
    mixers = [type(b.mixer).__name__ for b in model.blocks]
    assert mixers == ["CausalSelfAttention", "CausalBRA", "DHSA", "CausalSelfAttention"]
    assert all(isinstance(b.ffn, DuoFFN) and b.ffn.routing == "router" for b in model.blocks)
    patt = [i for i, b in enumerate(model.blocks) if isinstance(b.mixer.q, Pattention)]
    assert patt == [1, 2] and model.blocks[1].mixer.o.n_tokens == 128
    assert isinstance(model.blocks[1].mixer, CausalBRA) and isinstance(model.blocks[2].mixer, DHSA)


@pytest.mark.parametrize("training", [True, False])
def test_hybrid_is_causal(training):
    model = small_model().train(training)  # training: Duo's soft mixture; inference: hard routes
    with torch.no_grad():
        assert_causal(model, T=56, positions=(0, 9, 30, 47))


def test_hybrid_decodes_with_the_cache():
    model = small_model().eval()
    x = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(2))  # one sequence: DHSA's chunks
    cache = model.new_cache()
    with torch.no_grad():
        steps = torch.cat([model.step(x[:, i : i + 1], cache) for i in range(64)], dim=1)
        torch.testing.assert_close(steps, model(x), rtol=1e-5, atol=1e-5)
        assert _prefill_cache(model, x[:, :10])[1] is not None  # sampling takes the incremental path
    routes = torch.stack([b.ffn.route_fraction for b in model.blocks])  # the last step's routes, per layer
    assert routes.shape == (4, 3)
    prompt = x[0, :6].tolist()
    fast = generate(model, prompt, 70, temperature=1.0, seed=1)  # crosses max_seq_len: drops the cache at 64
    assert fast == generate(model, prompt, 70, temperature=1.0, seed=1, incremental=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("hybrid")
    return fit(HYBRID, micro_overrides(tmp, cache_dir, **SMALL))


def test_hybrid_trains_and_grows_exactly(trained, capsys):
    assert trained["val_loss"] < math.log(256)
    run = trained["run_dir"]
    assert main(["grow", str(run), "--scale", "2"]) == 0
    assert float(re.search(r"max \|logit change\| on a random batch: ([0-9.e+-]+)", capsys.readouterr().out)[1]) < 1e-5
    _, small = load_trained(run)
    _, big = load_trained(run / "grown-x2")
    counts = lambda m: [[p.n_tokens for p in b.modules() if isinstance(p, Pattention)] for b in m.blocks]  # noqa: E731
    assert counts(small) == [[], [16] * 4, [16] * 4, []] and counts(big) == [[], [32] * 4, [32] * 4, []]
    x = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        assert (big(x) - small(x)).abs().max() < 1e-5  # the grown model computes the same function


def test_hybrid_runs_the_oracle_and_samples(trained, capsys):
    run = trained["run_dir"]
    assert main(["oracle", str(run), "--batches", "1"]) == 0
    result = json.loads((run / "oracle" / "oracle.json").read_text())
    assert result["n_layers"] == 4 and result["n_routes"] == 16
    (router,) = result["routers"]  # the hybrid's own router (its checkpoint routes)
    assert router["run"] == str(run) and 0 <= router["mean_big_layers"] <= 4
    assert main(["sample", str(run), "--prompt", "ROMEO:", "--tokens", "30"]) == 0
    assert "ROMEO:" in capsys.readouterr().out
