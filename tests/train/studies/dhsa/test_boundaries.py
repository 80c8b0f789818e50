"""DHSA boundary predictors (``python -m train dhsa-boundaries``): attention-mass labels, focal loss, training,
the file that ``arch.dhsa.load_predictor`` reads and a DHSA model built from it, in our setting and the authors'."""

import dataclasses
import json
import math
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
    SETTINGS,
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
# a budget where the chunks decide the selection: blocks of 8 queries see 4 initial keys, 4 recent ones and 8
# keys of the top-scored chunks; threshold -100 with NMS radius 2: a boundary at every local maximum of the logits
SPARSE = [
    "model.mixer.budget=16",
    "model.mixer.query_block=8",
    "model.mixer.n_init=4",
    "model.mixer.n_recent=4",
    "model.mixer.threshold=-100",
    "model.mixer.nms_radius=2",
]


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


def released_labels(A: torch.Tensor, w: int) -> torch.Tensor:
    """The authors' labels, transcribed in their own indexing (legacy/utils/helper.py
    ``_compute_cumulative_attention_mass_ratio`` with smooth_ends, a layer without sliding window; train.py's soft
    label with alpha 2, beta log 2, binarized at 0.5, and its mask): candidate c is the gap after token c, rows
    c + w .. T − 1, past columns c − w + 1 .. c, future columns c + 1 .. c + w, valid 2w − 1 <= c < T − 2w.
    Returned at p = c + 1 (the first token of the next chunk), IGNORE where not valid. A [T, T] -> [T]."""
    T = A.shape[0]
    out = torch.full((T,), IGNORE, dtype=torch.int8)
    for c in range(2 * w - 1, T - 2 * w):
        past = sum(A[i, j].item() for i in range(c + w, T) for j in range(c - w + 1, c + 1))
        fut = sum(A[i, j].item() for i in range(c + w, T) for j in range(c + 1, c + w + 1))
        r = (max(past, fut) + 1e-6) / (min(past, fut) + 1e-6)
        soft = 1 / (1 + math.exp(-2.0 * (math.log(r + 1e-6) - math.log(2.0 + 1e-6))))
        out[c + 1] = int(soft >= 0.5)
    return out


def our_labels(A: torch.Tensor, w: int, ratio: float) -> torch.Tensor:
    """Our rule, written out: rows i >= p + w, columns [p − w, p) and [p, p + w), p in [w, T − 2w]. A [T, T]."""
    T = A.shape[0]
    out = torch.full((T,), IGNORE, dtype=torch.int8)
    for p in range(w, T - 2 * w + 1):
        before = A[p + w :, p - w : p].sum().item()
        after = A[p + w :, p : p + w].sum().item()
        out[p] = int((max(before, after) + 1e-12) / (min(before, after) + 1e-12) >= ratio)
    return out


@pytest.mark.parametrize("T, w", [(37, 3), (50, 4)])
def test_label_rows_of_each_setting_against_written_out_rules(T, w):
    g = torch.Generator().manual_seed(T)
    scores = torch.randn(2, T, T, generator=g, dtype=torch.float64) * 3  # peaked: single rows matter
    A = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    authors, ours = (boundary_labels(A, w, 2.0, SETTINGS[s]) for s in ("authors", "ours"))
    for b in range(2):
        assert torch.equal(authors[b], released_labels(A[b], w))
        assert torch.equal(ours[b], our_labels(A[b], w, 2.0))
    both = (authors != IGNORE) & (ours != IGNORE)
    assert (authors[both] != ours[both]).any()  # the one extra row of the authors' rule changes labels here
    assert (authors[both] == 1).any() and (authors[both] == 0).any()


def test_the_authors_rows_include_the_last_query_of_the_window_after_p():
    T, w, p = 16, 4, 8
    A = uniform_causal(T)
    A[0, p + w - 1] = 0
    A[0, p + w - 1, p - w : p] = 1 / w  # query p + w - 1 attends only to the w keys before p
    A[0, p + w :] = 0
    A[0, p + w :, 0] = 0.9  # the later queries: mostly on token 0, the rest split evenly across p
    A[0, p + w :, p - w : p + w] = 0.1 / (2 * w)
    assert boundary_labels(A, w, 2.0, SETTINGS["authors"])[0, p] == 1  # rows i >= p + w - 1: 1.2 : 0.2
    assert boundary_labels(A, w, 2.0, SETTINGS["ours"])[0, p] == 0  # rows i >= p + w: 0.2 : 0.2
    assert (boundary_labels(A, w, 2.0, SETTINGS["authors"])[0, : 2 * w] == IGNORE).all()


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


def test_the_authors_focal_loss_against_a_hand_computation():
    """γ 2, no α, pos_weight 1.3 (legacy/boundary_predictor/loss.py ``focal_bce_loss``), by hand at three points."""
    s = SETTINGS["authors"]
    logits, y = torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64), torch.tensor([1, 0, 1])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    by_hand = [
        (1 - 0.5) ** 2 * 1.3 * math.log(2),  # positive at p = 0.5: weighted BCE 1.3 log 2
        sig(2.0) ** 2 * math.log(1 + math.exp(2.0)),  # negative at p = σ(2): (1 - p_t)² = p², BCE log(1 + e²)
        (1 - sig(-1.0)) ** 2 * 1.3 * math.log(1 + math.e),  # positive at p = σ(-1): BCE log(1 + e)
    ]
    got = focal_loss(logits, y, s.gamma, s.alpha, s.pos_weight)
    torch.testing.assert_close(got, torch.tensor(sum(by_hand) / 3, dtype=torch.float64), rtol=1e-12, atol=0)
    assert (s.gamma, s.alpha, s.pos_weight) == (2.0, None, 1.3)


def test_training_decreases_the_loss_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(4, 24, 8, generator=g) for _ in range(2)]  # [B, T, C] per batch
    # a learnable rule: boundary where the key at p points the other way than the key before it
    labels = [(torch.cosine_similarity(k[:, 1:], k[:, :-1], dim=-1) < -0.3).to(torch.int8) for k in keys]
    labels = [F.pad(y, (1, 0), value=IGNORE) for y in labels]
    bce = dataclasses.replace(SETTINGS["ours"], gamma=0.0, alpha=None)
    run = lambda seed: train_predictors(
        {0: keys}, {0: labels}, n_heads=2, hidden=32, steps=40, lr=3e-3, seed=seed, setting=bce, progress=False
    )  # noqa: E731
    preds, losses = run(0)
    assert losses.shape == (40, 1)
    assert losses[-5:].mean() < 0.6 * losses[:2].mean()
    again, losses2 = run(0)
    assert torch.equal(losses, losses2)
    assert all(torch.equal(a, b) for a, b in zip(preds[0].state_dict().values(), again[0].state_dict().values()))
    other, _ = run(1)
    assert not torch.equal(other[0].mlp[0].weight, preds[0].mlp[0].weight)


def test_the_shared_predictor_is_one_module_trained_on_every_layer():
    g = torch.Generator().manual_seed(1)
    keys = {i: [torch.randn(2, 24, 8, generator=g)] for i in (0, 1)}
    labels = {i: [torch.randint(0, 2, (2, 24), generator=g, dtype=torch.int8)] for i in (0, 1)}
    kw = dict(n_heads=2, hidden=16, steps=3, setting=SETTINGS["authors"], progress=False)
    preds, losses = train_predictors(keys, labels, **kw)
    assert preds[0] is preds[1] and not preds[0].residual and losses.shape == (3, 2)
    alone, _ = train_predictors({0: keys[0]}, {0: labels[0]}, **kw)  # same init: the seed
    assert not torch.equal(alone[0].mlp[0].weight, preds[0].mlp[0].weight)  # layer 1's gradient counted
    twice, losses2 = train_predictors({0: keys[0], 1: keys[0]}, {0: labels[0], 1: labels[0]}, **kw)
    torch.testing.assert_close(losses2[:, 0], losses2[:, 1], rtol=0, atol=0)  # one predictor, same inputs
    per_layer, _ = train_predictors(
        {0: keys[0], 1: keys[0]}, {0: labels[0], 1: labels[0]}, **{**kw, "setting": SETTINGS["ours"]}
    )
    assert per_layer[0] is not per_layer[1] and per_layer[0].residual


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A micro dense run and its boundary predictors at the default path (our setting) and in the authors'."""
    tmp = tmp_path_factory.mktemp("bnd")
    assert main(["fit", TINY, *micro_overrides(tmp, cache_dir, **MICRO)]) == 0
    (run,) = (tmp / "runs" / "gpt-tiny").iterdir()
    result = dhsa_boundaries(str(run), batches=2, val_batches=1, steps=4, hidden=32, progress=False)
    return run, result


@pytest.fixture(scope="module")
def authors(trained):
    run, _ = trained
    out = run / "dhsa" / "authors.safetensors"
    kw = dict(batches=2, val_batches=1, steps=4, hidden=32, progress=False)
    return run, dhsa_boundaries(str(run), setting="authors", out=str(out), **kw)


def selections(model, x: torch.Tensor) -> list[torch.Tensor]:
    """The key selection [B, nb, S] of every DHSA layer of ``model`` on tokens x."""
    seen = []
    handles = [b.mixer.selection_tap.register_forward_hook(lambda m, i, o: seen.append(i[2])) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def with_predictors(run, preds: dict, options: list[str]):
    """The dense run as a learned-chunker DHSA model (``options``) without a predictor file, the predictors
    ``preds`` ({layer: BoundaryPredictor}) copied in: the reference for a model built from the file."""
    _, model = load_trained(run, ["model.mixer.type=dhsa", "model.mixer.chunker=learned", *options])
    for i, block in enumerate(model.blocks):
        block.mixer.boundary.load_state_dict(preds[i].state_dict())
    return model


def assert_the_switch_builds_the_trained_predictors(run, result, learned: list[str]):
    """At a budget where chunks matter: the model from the printed switch gives the logits of the dense weights
    with the in-memory predictors, and its selections differ from fixed chunks and from untrained predictors."""
    _, dhsa = load_trained(run, [*result["switch"].split(), *SPARSE])
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    reference = with_predictors(run, result["predictors"], [*learned, *SPARSE])
    with torch.no_grad():
        torch.testing.assert_close(dhsa(x), reference(x), rtol=0, atol=0)
    _, fixed = load_trained(run, ["model.mixer.type=dhsa", "model.mixer.chunker=fixed", *SPARSE[:4]])
    _, untrained = load_trained(run, ["model.mixer.type=dhsa", "model.mixer.chunker=learned", *learned, *SPARSE])
    ours = selections(dhsa, x)
    for other in (fixed, untrained):
        assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(ours, selections(other, x)))
    with torch.no_grad():
        assert (dhsa(x) - fixed(x)).abs().max() > 1e-4


def test_file_loads_into_every_layer_with_the_trained_logits(trained):
    run, result = trained
    path = run / "dhsa" / "boundaries.safetensors"
    assert result["out"] == path and path.is_file()
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ("dim", "n_heads", "window", "hidden", "residual", "ratio", "setting")} == {
        "dim": "16",
        "n_heads": "1",
        "window": "4",
        "hidden": "32",
        "residual": "1",
        "ratio": "2.0",
        "setting": "ours",
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
    assert "model.mixer.predictor_hidden=32" in result["switch"] and "shared" not in result["switch"]
    _, dense = load_trained(run)
    _, dhsa = load_trained(run, result["switch"].split())
    with safe_open(str(result["out"]), framework="pt") as f:
        for i, block in enumerate(dhsa.blocks):
            assert isinstance(block.mixer, DHSA) and block.mixer.chunker == "learned" and block.mixer.boundary.residual
            for name, p in block.mixer.boundary.state_dict().items():
                assert torch.equal(p, f.get_tensor(f"layers.{i}.{name}")), name
            assert torch.equal(block.mixer.k.weight, dense.blocks[i].mixer.k.weight)
    assert not torch.equal(result["predictors"][0].mlp[0].weight, result["predictors"][1].mlp[0].weight)
    assert_the_switch_builds_the_trained_predictors(run, result, ["model.mixer.predictor_hidden=32"])


def test_the_authors_setting_writes_one_shared_predictor_that_the_switch_loads_into_every_layer(authors):
    run, result = authors
    assert result["predictors"][0] is result["predictors"][1] and not result["predictors"][0].residual
    for option in ("shared_predictor=true", "predictor_residual=false", "share_boundaries=true"):
        assert f"model.mixer.{option}" in result["switch"]
    with safe_open(str(result["out"]), framework="pt") as f:
        assert f.metadata()["residual"] == "0" and f.metadata()["setting"] == "authors"
        assert all(n.startswith("shared.") for n in f.keys()) and "shared.mlp.2.weight" in f.keys()
        _, dhsa = load_trained(run, result["switch"].split())
        for block in dhsa.blocks:
            assert not block.mixer.boundary.residual and block.mixer.share_boundaries
            for name, p in block.mixer.boundary.state_dict().items():
                assert torch.equal(p, f.get_tensor(f"shared.{name}")), name
    learned = ["model.mixer.predictor_hidden=32", "model.mixer.predictor_residual=false"]
    assert_the_switch_builds_the_trained_predictors(run, result, [*learned, "model.mixer.share_boundaries=true"])
    report = json.loads((run / "dhsa" / "authors.json").read_text())
    assert report["setting"]["name"] == "authors" and [r["layer"] for r in report["layers"]] == [0, 1]
    assert all(r["val_positions"] == 4 * (64 - 4 * 4 + 1) for r in report["layers"])  # p in [8, 56]


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
