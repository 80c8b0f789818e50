"""Image classification: digits source, augmentation, a BiFormer fit, info at 224² beside the paper."""

import numpy as np
import pytest
import torch

from arch.registry import ConfigError
from train.cli import main
from train.config import load_config
from train.evaluate import evaluate
from train.fit import fit
from train.images import HFImageSource, random_resized_crop
from train.module import topk_accuracy

from ..conftest import CONFIGS

DIGITS = str(CONFIGS / "vision/biformer-tiny-digits.yaml")


def micro(tmp_path, **extra):
    base = {
        "model.depths": "[1,1,1,1]",
        "model.dims": "[16,16,32,32]",
        "model.head_dim": 8,
        "model.image_size": 16,
        "data.source.image_size": 16,
        "data.source.val_fraction": 0.1,
        "data.batch_size": 16,
        "trainer.max_steps": 3,
        "trainer.log_every": 1,
        "trainer.val_every": 3,
        "trainer.ckpt_every": 3,
        "trainer.out_dir": str(tmp_path / "runs"),
        "trainer.progress_bar": False,
        "optim.warmup_steps": 1,
    }
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def test_digits_fit_logs_accuracy_and_exports(tmp_path, capsys):
    out = fit(DIGITS, micro(tmp_path))
    assert 0.0 <= out["val_acc1"] <= out["val_acc5"] <= 1.0 and np.isfinite(out["val_loss"])
    assert sorted(p.name for p in (out["run_dir"] / "model").iterdir()) == ["config.yaml", "model.safetensors"]
    text = capsys.readouterr().out
    assert "179 held-out images" in text and "top-1" in text and "top-5" in text
    metrics = (out["run_dir"] / "csv" / "metrics.csv").read_text()
    assert "val/acc1" in metrics and "val/acc5" in metrics and "train/acc1" in metrics
    again = evaluate(str(out["run_dir"]))  # `eval` of a classifier run: the same held-out images and weights
    assert again["loss"] == pytest.approx(out["val_loss"], rel=1e-5) and again["images"] == 179
    assert again["acc1"] == pytest.approx(out["val_acc1"], abs=1e-6)


def test_info_prints_params_and_flops_beside_the_paper(capsys):
    assert main(["info", str(CONFIGS / "paper/biformer-t.yaml")]) == 0
    out = capsys.readouterr().out
    assert "13,142,760" in out and "paper (BiFormer-T, 1000 classes): 13.1M" in out
    assert "FLOPs at 224x224: 2.2" in out and "paper: 2.2 G" in out


def test_text_source_with_image_model_is_a_config_error():
    with pytest.raises(ConfigError, match="data.source.type: 'digits' is a classification source but model.kind 'lm'"):
        load_config(CONFIGS / "lm/gpt-tiny.yaml", ["data.source={type: digits}"])
    with pytest.raises(ConfigError, match="data.augment.flip: unknown key"):
        load_config(DIGITS, ["data.augment.flip=true"])


def test_random_resized_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 16, 16)
    same = random_resized_crop(x, [1.0, 1.0], hflip=False, gen=g)  # full-area crop of aspect != 1 still crops
    assert same.shape == x.shape
    ident = torch.stack([random_resized_crop(x[:1], [1.0, 1.0], False, g) for _ in range(20)])
    assert (ident - x[:1]).abs().amax((1, 2, 3, 4)).min() < 0.3  # some draws are (almost) the identity
    flipped = random_resized_crop(x, [1.0, 1.0], hflip=True, gen=torch.Generator().manual_seed(1))
    assert flipped.shape == x.shape and not torch.equal(flipped, same)


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3]])
    assert topk_accuracy(logits, torch.tensor([1, 2]), 1) == 0.5
    assert topk_accuracy(logits, torch.tensor([1, 2]), 2) == 1.0
    assert topk_accuracy(logits, torch.tensor([2, 1]), 5) == 1.0  # k capped at the number of classes


def test_hf_image_source_reads_a_local_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "validation"):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / split / label / f"{i}.png")
    src = HFImageSource(name="imagefolder", data_dir=str(tmp_path), image_size=12)
    splits = src.load()
    x, y = splits["train"][0]
    assert x.shape == (3, 12, 12) and 0.0 <= x.min() <= x.max() <= 1.0 and y in (0, 1)
    assert src.num_classes == 2 and len(splits["validation"]) == 4
