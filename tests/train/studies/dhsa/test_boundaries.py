"""DHSA boundary predictors (``python -m train dhsa-boundaries``): attention-mass labels, focal loss, training,
the file that ``arch.dhsa.load_predictor`` reads and a DHSA model built from it."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from arch.attention import causal_attention
from arch.dhsa import DHSA, BoundaryPredictor, load_predictor
from train.checkpoint import load_trained
from train.cli import main
from train.studies.dhsa.boundaries import (
    IGNORE,
    attention_probs,
    boundary_labels,
    dhsa_boundaries,
    focal_loss,
    train_predictors,
)

from ....conftest import CONFIGS, micro_overrides

TINY = str(CONFIGS / "lm/gpt-tiny.yaml")
# T 64, GQA (2 query heads, 1 kv head: predictor dim 16), a small predictor MLP (a non-default mixer option)
MICRO = {"model.max_seq_len": 64, "model.n_kv_heads": 1}
OPTS = ["--batches", "2", "--val-batches", "1", "--steps", "4", "--hidden", "32"]


def uniform_causal(T: int) -> torch.Tensor:  # [1, T, T]: query i spreads its mass evenly over keys 0..i
    return torch.tril(torch.ones(T, T, dtype=torch.float64)).div(torch.arange(1, T + 1)[:, None])[None]


def test_labels_of_hand_built_attention():
    T, w, p = 16, 4, 8  # labeled candidates: p in [w, T - 2w] = [4, 8]
    A = uniform_causal(T)
    labels = boundary_labels(A, w, ratio=2.0)
    assert labels.dtype == torch.int8 and labels.shape == (1, T)
    assert (labels[0, :w] == IGNORE).all() and (labels[0, T - 2 * w + 1 :] == IGNORE).all()
    assert (labels[0, w : T - 2 * w + 1] == 0).all()  # uniform: as much mass before p as after
    before = A.clone()
    before[0, p + w :] = 0
    before[0, p + w :, p - w : p] = 1 / w  # every later query attends only to the w keys just before p
    assert boundary_labels(before, w, 2.0)[0, p] == 1
    after = A.clone()
    after[0, p + w :] = 0
    after[0, p + w :, p : p + w] = 1 / w  # ... or only to the w keys from p on
    assert boundary_labels(after, w, 2.0)[0, p] == 1
    mild = A.clone()  # before / after = 1.5: a boundary at ratio 1.4, not at 2
    mild[0, p + w :] = 0
    mild[0, p + w :, p - w : p], mild[0, p + w :, p : p + w] = 0.6 / w, 0.4 / w  # ratio 1.5
    assert boundary_labels(mild, w, 2.0)[0, p] == 0 and boundary_labels(mild, w, 1.4)[0, p] == 1


def test_attention_probs_are_the_head_mean_of_dense_causal_attention():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 12, 4, 8, generator=g), torch.randn(2, 12, 2, 8, generator=g)
    v = torch.randn(2, 12, 1, 8, generator=g)
    A = attention_probs(q, k)  # [B, T, T], GQA: 4 query heads over 2 kv heads
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 12, dtype=torch.float64))
    assert (A.triu(1) == 0).all()
    v2 = v.expand(-1, -1, 2, -1)  # the same values in both kv heads: head-mean of outputs = A @ v
    torch.testing.assert_close(
        torch.einsum("bij,bjd->bid", A.float(), v[:, :, 0]), causal_attention(q, k, v2).mean(2), atol=1e-5, rtol=1e-5
    )


def test_focal_loss_against_cross_entropy_and_its_formula():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(50, generator=g) * 3, torch.randint(0, 2, (50,), generator=g)
    bce = F.binary_cross_entropy_with_logits(logits, y.float())
    torch.testing.assert_close(focal_loss(logits, y, gamma=0.0, alpha=None), bce)
    torch.testing.assert_close(focal_loss(logits, y, gamma=0.0, alpha=0.5), 0.5 * bce)
    p = torch.sigmoid(logits)
    p_t = torch.where(y == 1, p, 1 - p)
    a_t = torch.where(y == 1, 0.25, 0.75)
    torch.testing.assert_close(focal_loss(logits, y, gamma=2.0, alpha=0.25), (-a_t * (1 - p_t) ** 2 * p_t.log()).mean())


def test_training_decreases_the_loss_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(4, 24, 8, generator=g) for _ in range(2)]  # [B, T, C] per batch
    # a learnable rule: boundary where the key at p points the other way than the key before it
    labels = [(torch.cosine_similarity(k[:, 1:], k[:, :-1], dim=-1) < -0.3).to(torch.int8) for k in keys]
    labels = [F.pad(y, (1, 0), value=IGNORE) for y in labels]
    run = lambda seed: train_predictors(
        {0: keys},
        {0: labels},
        n_heads=2,
        hidden=32,
        steps=40,
        lr=3e-3,
        seed=seed,
        gamma=0.0,
        alpha=None,
        progress=False,
    )  # noqa: E731
    preds, losses = run(0)
    assert losses.shape == (40, 1)
    assert losses[-5:].mean() < 0.6 * losses[:2].mean()
    again, losses2 = run(0)
    assert torch.equal(losses, losses2)
    assert all(torch.equal(a, b) for a, b in zip(preds[0].state_dict().values(), again[0].state_dict().values()))
    other, _ = run(1)
    assert not torch.equal(other[0].mlp[0].weight, preds[0].mlp[0].weight)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A micro dense run and its boundary predictors at the default path."""
    tmp = tmp_path_factory.mktemp("bnd")
    assert main(["fit", TINY, *micro_overrides(tmp, cache_dir, **MICRO)]) == 0
    (run,) = (tmp / "runs" / "gpt-tiny").iterdir()
    result = dhsa_boundaries(str(run), batches=2, val_batches=1, steps=4, hidden=32, progress=False)
    return run, result


def test_file_loads_into_every_layer_with_the_trained_logits(trained):
    run, result = trained
    path = run / "dhsa" / "boundaries.safetensors"
    assert result["out"] == path and path.is_file()
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ("dim", "n_heads", "window", "hidden", "ratio")} == {
        "dim": "16",
        "n_heads": "1",
        "window": "4",
        "hidden": "32",
        "ratio": "2.0",
    }
    assert meta["source"] == str(run.resolve())
    k = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(0))
    for layer in (0, 1):
        loaded = BoundaryPredictor(16, 1, 4, 32)
        load_predictor(loaded, path, layer)
        torch.testing.assert_close(loaded(k), result["predictors"][layer](k), rtol=0, atol=0)
    report = json.loads((run / "dhsa" / "boundaries.json").read_text())
    assert [r["layer"] for r in report["layers"]] == [0, 1] and report["args"]["hidden"] == 32
    for r in report["layers"]:
        assert 0 <= r["val_pos_rate"] <= 1 and 0 <= r["val_f1"] <= 1 and 1 <= r["val_mean_chunk_len"] <= 64
        assert r["val_positions"] == 4 * (64 - 3 * 4 + 1)  # 4 windows x labeled p in [4, 52]


def test_dhsa_model_from_the_dense_checkpoint_and_the_printed_switch(trained):
    run, result = trained
    assert "model.mixer.predictor_hidden=32" in result["switch"]
    _, dense = load_trained(run)
    _, dhsa = load_trained(run, result["switch"].split())
    with safe_open(str(result["out"]), framework="pt") as f:
        for i, block in enumerate(dhsa.blocks):
            assert isinstance(block.mixer, DHSA) and block.mixer.chunker == "learned"
            for name, p in block.mixer.boundary.state_dict().items():
                assert torch.equal(p, f.get_tensor(f"layers.{i}.{name}")), name
            assert torch.equal(block.mixer.k.weight, dense.blocks[i].mixer.k.weight)
    x = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # budget 2048 >= T: DHSA is exactly dense attention
        torch.testing.assert_close(dhsa(x), dense(x), atol=1e-5, rtol=1e-5)


def test_cli_prints_the_table_and_the_same_seed_gives_the_same_file(trained, tmp_path, capsys):
    run, _ = trained
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["dhsa-boundaries", str(run), *OPTS, "--out", str(a)]) == 0
    out = capsys.readouterr().out
    num = r"[\d.]+"
    assert re.search(rf"^\| 1 \| {num} \| {num} \| {num} \| {num} \| {num} \| {num} \| .* \| {num} \|$", out, re.M)
    assert f"model.mixer.predictor={a}" in out and (tmp_path / "a.json").is_file()
    assert main(["dhsa-boundaries", str(run), *OPTS, "--out", str(b)]) == 0
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys()) and "layers.1.mlp.2.weight" in fa.keys()
        assert all(torch.equal(fa.get_tensor(n), fb.get_tensor(n)) for n in fa.keys())


def test_bad_arguments_name_the_option_and_the_allowed_values(trained, capsys):
    run, _ = trained
    assert main(["dhsa-boundaries", str(run), "--ratio", "0.5"]) == 2
    assert "--ratio: 0.5 is not allowed; allowed values: a number >= 1" in capsys.readouterr().err
    assert main(["dhsa-boundaries", str(run), "--alpha", "2"]) == 2
    assert "--alpha: 2.0 is not allowed" in capsys.readouterr().err
