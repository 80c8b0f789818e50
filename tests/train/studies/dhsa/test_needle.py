"""``python -m train needle``: prompt builder, teacher-forced scoring, perplexity windows, variants, the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from arch.registry import ConfigError
from train.cli import main
from train.data import ByteTokenizer
from train.fit import fit
from train.studies.dhsa.needle import (
    NEEDLE,
    QUESTION,
    build_cells,
    build_prompt,
    fixed_tokens,
    needle,
    ppl_windows,
    score_prompts,
    variant_table,
)

from ....conftest import CONFIGS, micro_overrides

TINY = str(CONFIGS / "lm/gpt-tiny.yaml")
TOK = ByteTokenizer()
LENGTHS = ["128", "192", "256"]  # the needle, question and answer take 104 bytes
FAST = ["--lengths", *LENGTHS, "--depths", "0", "0.5", "1", "--trials", "3", "--ppl-tokens", "512"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    """A micro LM with a 256-byte context, trained for 6 steps."""
    tmp = tmp_path_factory.mktemp("needle")
    return fit(TINY, micro_overrides(tmp, cache_dir, **{"model.max_seq_len": 256}))["run_dir"]


# --------------------------------------------------------------------------------------------- prompts
def test_prompt_is_exactly_the_length_with_the_needle_at_its_depth():
    hay = TOK.encode("lorem ipsum dolor sit amet, " * 40)
    needle_ids, tail = TOK.encode(NEEDLE.format(key="48213")), TOK.encode(QUESTION + "48213")
    for L in (120, 200, 333):
        first = build_prompt(hay, L, 0.0, "48213", TOK)
        assert len(first.ids) == L and first.ids[-len(tail) :] == tail and first.answer_start == L - 5
        assert first.needle_start == 0 and first.ids[: len(needle_ids)] == needle_ids  # depth 0: at the start
        last = build_prompt(hay, L, 1.0, "48213", TOK)
        assert len(last.ids) == L and last.needle_start == last.haystack_len  # depth 1: right before the question
        assert last.ids[last.needle_start : last.needle_start + len(needle_ids)] == needle_ids
        assert last.ids[last.needle_start + len(needle_ids) :] == tail
        mid = build_prompt(hay, L, 0.5, "48213", TOK)
        s, n = mid.needle_start, mid.needle_len
        assert abs(s - mid.haystack_len / 2) <= 6 and mid.depth == s / mid.haystack_len
        assert chr(mid.ids[s - 1]) == " " or chr(mid.ids[s + n]) == " "  # snapped to a word boundary
        # the haystack itself is untouched: removing the needle gives its first tokens back
        assert mid.ids[:s] + mid.ids[s + n : -len(tail)] == hay[: mid.haystack_len]


def test_needle_stays_at_the_exact_depth_without_whitespace_nearby():
    p = build_prompt(TOK.encode("x" * 400), 300, 0.5, "11111", TOK)
    assert p.needle_start == round(0.5 * p.haystack_len)


def test_prompt_errors_name_the_length_and_depth():
    need = fixed_tokens(TOK)
    assert need == len(NEEDLE.format(key="12345")) + len(QUESTION) + 5
    with pytest.raises(ConfigError, match=rf"--lengths: {need} leaves no room.*allowed lengths: >= {need + 1}"):
        build_prompt(TOK.encode("a b " * 100), need, 0.5, "12345", TOK)
    with pytest.raises(ConfigError, match="--depths: 1.5 is outside"):
        build_prompt(TOK.encode("a b " * 100), 200, 1.5, "12345", TOK)


def test_cells_are_seeded_and_share_haystack_and_passkey_across_depths():
    tokens = np.frombuffer(("the quick brown fox jumps over the lazy dog. " * 200).encode(), np.uint8).astype(np.int32)
    a = build_cells(tokens, TOK, [128, 200], [0.0, 0.5, 1.0], 4, seed=3)
    assert a == build_cells(tokens, TOK, [128, 200], [0.0, 0.5, 1.0], 4, seed=3)  # same seed, same prompts
    assert a != build_cells(tokens, TOK, [128, 200], [0.0, 0.5, 1.0], 4, seed=4)
    for L in (128, 200):
        keys = [p.passkey for p in a[L, 0.0]]
        assert all(len(k) == 5 and k.isdigit() for k in keys) and len(set(keys)) > 1
        for d in (0.5, 1.0):
            assert [p.passkey for p in a[L, d]] == keys
            assert all(len(p.ids) == L for p in a[L, d])
    letters = build_cells(tokens, TOK, [128], [0.5], 4, seed=3, key="letters")[128, 0.5]
    assert all(len(p.passkey) == 5 and p.passkey.isalpha() and p.passkey.isupper() for p in letters)
    assert TOK.decode(letters[0].ids[letters[0].answer_start :]) == letters[0].passkey


# --------------------------------------------------------------------------------------------- scoring
class Stub(nn.Module):
    """Logits we control: ``next`` maps input ids [N, L] to the predicted next ids [N, L]."""

    def __init__(self, next_fn):
        super().__init__()
        self.next_fn = next_fn

    def forward(self, ids):  # [N, L] -> [N, L, 256]
        return 20.0 * nn.functional.one_hot(self.next_fn(ids), 256).float()


def test_teacher_forced_scoring_on_stub_models():
    hay = TOK.encode("to be or not to be, that is the question. " * 10)
    prompts = [build_prompt(hay, 160, d, key, TOK) for d, key in ((0.0, "12345"), (0.5, "67890"), (1.0, "24680"))]
    perfect = score_prompts(Stub(lambda ids: ids.roll(-1, dims=1)), prompts)  # always the true next byte
    assert perfect["accuracy"] == 1.0 and perfect["digit_accuracy"] == 1.0 and perfect["answer_logprob"] > -1e-6
    zero = score_prompts(Stub(torch.zeros_like), prompts)  # always byte 0
    assert zero["accuracy"] == 0.0 and zero["digit_accuracy"] == 0.0
    assert zero["answer_logprob"] == pytest.approx(-20.0 - math.log(1 + 255 * math.exp(-20.0)), abs=1e-4)

    def last_digit_wrong(ids):
        nxt = ids.roll(-1, dims=1)
        nxt[:, -2] = 0  # the position that predicts the 5th digit
        return nxt

    four = score_prompts(Stub(last_digit_wrong), prompts)
    assert four["accuracy"] == 0.0 and four["digit_accuracy"] == pytest.approx(0.8)


def test_ppl_windows_score_the_same_text_at_every_length():
    w = ppl_windows(10_000, [32, 64, 128], max_tokens=512)  # 4 spans of 128 tokens
    targets = {L: {int(s) + t for s in starts for t in range(1, L + 1)} for L, starts in w.items()}
    assert len(w[128]) == 4 and len(w[32]) == 16 and targets[32] == targets[64] == targets[128]
    assert max(w[128]) + 129 <= 10_000
    assert len(ppl_windows(10_000, [128], max_tokens=1)[128]) == 1  # at least one window
    with pytest.raises(ConfigError, match="longer than the held-out split"):
        ppl_windows(100, [128], 512)


def test_variant_table():
    t = variant_table(64, ["chunker=learned", "predictor=p.pt", "mode=prefill", "shared_predictor=true"])
    assert t["dense"] == []
    assert t["dhsa"] == [
        "model.mixer.type=dhsa",
        "model.mixer.budget=64",
        "model.mixer.chunker=learned",
        "model.mixer.mode=prefill",
        "model.mixer.predictor=p.pt",
        "model.mixer.shared_predictor=true",
    ]
    # the variant's own chunker wins; the learned chunker's own options (which fixed chunks reject) are not given
    assert t["fixed"] == t["dhsa"][:-2] + ["model.mixer.chunker=fixed"]
    t = variant_table(64, ["predictor_residual=false", "n_init=16"])
    assert t["fixed"] == ["model.mixer.type=dhsa", "model.mixer.budget=64", "model.mixer.n_init=16"] + [
        "model.mixer.chunker=fixed"
    ]
    assert t["dhsa"] == t["fixed"][:-1] + ["model.mixer.predictor_residual=false"]
    with pytest.raises(ConfigError, match="--mixer 'chunker': expected key=value"):
        variant_table(64, ["chunker"])


# --------------------------------------------------------------------------------------------- end to end
def test_needle_cli_writes_json_and_plots(run, capsys):
    assert main(["needle", str(run), "--variants", "dense", *FAST]) == 0
    out = capsys.readouterr().out
    assert f"writing {run / 'needle'}/" in out and "passkey accuracy, dense" in out and "| 256 |" in out
    assert {p.name for p in (run / "needle").iterdir()} == {"needle.json", "needle.png", "ppl.png"}
    r = json.loads((run / "needle" / "needle.json").read_text())
    assert r["lengths"] == [128, 192, 256] and r["depths"] == [0.0, 0.5, 1.0] and r["trials"] == 3
    assert r["arguments"]["variants"] == ["dense"] and r["variants"]["dense"]["overrides"] == []
    assert r["arguments"]["budget"] is None and r["arguments"]["budget_resolved"] == 64  # longest length // 4
    dense = r["variants"]["dense"]
    assert dense["layer_mixers"] == ["dense", "dense"]
    for key in ("accuracy", "digit_accuracy"):
        grid = np.array(dense["passkey"][key])  # [depths, lengths]
        assert grid.shape == (3, 3) and ((grid >= 0) & (grid <= 1)).all()
    assert (np.array(dense["passkey"]["answer_logprob"]) < 0).all()
    assert [p["length"] for p in dense["ppl"]] == [128, 192, 256]
    assert [p["tokens"] for p in dense["ppl"]] == [512, 384, 512]  # 2 spans of 256: 2, 1 and 1 windows each
    for p in dense["ppl"]:
        assert p["ppl"] == pytest.approx(math.exp(p["loss"])) and p["ppl_ratio_vs_dense"] == 1
        assert 1 < p["ppl"] < 300


def test_variants_with_the_same_model_give_the_same_numbers(run, tmp_path, capsys):
    variants = {"dense": [], "again": [], "sdpa": ["model.mixer.attn_backend=sdpa"]}
    r = needle(
        str(run), [], variants, [128, 256], [0.0, 1.0], trials=2, ppl_tokens=256, out_dir=str(tmp_path), progress=False
    )
    v = r["variants"]
    assert v["sdpa"]["overrides"] == ["model.mixer.attn_backend=sdpa"]
    assert v["again"]["passkey"] == v["dense"]["passkey"]  # identical prompts, identical model
    for key in ("accuracy", "answer_logprob"):
        np.testing.assert_allclose(v["sdpa"]["passkey"][key], v["dense"]["passkey"][key], rtol=1e-5)
    assert [p["ppl_ratio_vs_dense"] for p in v["sdpa"]["ppl"]] == pytest.approx([1.0, 1.0])
    assert "| length | dense | again | sdpa | again / dense | sdpa / dense |" in capsys.readouterr().out


def test_sparse_variants_record_attention_recall(run, tmp_path, capsys):
    variants = {
        "dense": [],
        "dhsa": [
            "model.mixer.type=dhsa",
            "model.mixer.budget=16",
            "model.mixer.n_init=4",
            "model.mixer.n_recent=8",
            "model.mixer.query_block=8",
        ],
        "all": ["model.mixer.type=dhsa", "model.mixer.budget=256"],
    }
    r = needle(
        str(run), [], variants, [128, 256], [0.5], trials=1, ppl_tokens=256, out_dir=str(tmp_path), progress=False
    )
    v = r["variants"]
    assert "recall" not in v["dense"]["ppl"][0]
    assert [p["recall"] for p in v["all"]["ppl"]] == pytest.approx([1.0, 1.0])  # budget >= T: every key
    assert [p["ppl_ratio_vs_dense"] for p in v["all"]["ppl"]] == pytest.approx([1.0, 1.0], abs=1e-4)
    for p in v["dhsa"]["ppl"]:
        assert 0.2 < p["recall"] < 1 and len(p["recall_per_layer"]) == 2  # one per DHSA layer
    assert "attention recall" in capsys.readouterr().out


def test_needle_errors(run, tmp_path, capsys):
    assert main(["needle", str(run), "--variants", "dense", "--lengths", "128", "512", "--out", str(tmp_path)]) == 2
    assert "--lengths: 512 exceeds the model's max_seq_len=256" in capsys.readouterr().err
    assert main(["needle", str(run / "model"), "--variants", "dense", "--lengths", "64", "--out", str(tmp_path)]) == 2
    assert "--lengths: 64 leaves no room for a haystack" in capsys.readouterr().err
    assert main(["needle", str(run), "--depths", "-0.5", "--out", str(tmp_path)]) == 2
    assert "--depths: -0.5; allowed depths: 0..1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"variant bad \(model.mixer.window=3\): model.mixer.window: unknown key"):
        needle(str(run), [], {"dense": [], "bad": ["model.mixer.window=3"]}, [128], out_dir=str(tmp_path))
    assert not list(tmp_path.iterdir())  # nothing evaluated or written before every variant is checked


def test_selection_recall_against_direct_softmax():
    from train.studies.dhsa.needle import selection_recall

    g = torch.Generator().manual_seed(0)
    T, qb = 21, 4
    q, k = torch.randn(1, T, 4, 8, generator=g), torch.randn(1, T, 2, 8, generator=g)
    nb = -(-T // qb)
    every = torch.arange(T).expand(1, nb, T)  # every key: recall 1 (the future ones are not counted)
    torch.testing.assert_close(selection_recall(q, k, every, qb), torch.ones(4, T))
    first = torch.tensor([0, -1, -1]).expand(1, nb, 3)  # only key 0: its softmax weight
    kk = k.repeat_interleave(2, dim=2)[0]  # [T, H, hd]
    s = torch.einsum("thd,shd->hts", q[0], kk) * 8**-0.5
    p = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    torch.testing.assert_close(selection_recall(q, k, first, qb), p[:, :, 0])
