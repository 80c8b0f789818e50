"""The DeiT recipe of the BiFormer paper configs as options: label smoothing and the EMA of weights (torch's,
tested here against independent definitions), RandAugment, random erasing and mixup/cutmix (timm's: without timm a
ConfigError before anything is written; with timm, the tests marked so run them)."""

import sys

import pytest
import torch
import torch.nn.functional as F

from arch.registry import ConfigError
from train.config import load_config
from train.fit import fit
from train.module import ClassifierModule

from ..conftest import CONFIGS
from .test_classify import DIGITS, micro

TIMM_OPTIONS = {
    "rand_augment": "rand-m9-mstd0.5-inc1",
    "random_erasing": 0.25,
    "mixup": 0.8,
    "cutmix": 1.0,
}


@pytest.mark.parametrize("key", TIMM_OPTIONS)
def test_timm_options_without_timm_fail_before_anything_is_written(key, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError, installed or not
    with pytest.raises(ConfigError, match=rf"data.augment.{key} needs timm .*pip install '\.\[vision\]'"):
        fit(DIGITS, micro(tmp_path, **{f"data.augment.{key}": TIMM_OPTIONS[key]}))
    assert not (tmp_path / "runs").exists()


def test_paper_configs_carry_the_deit_recipe_and_load_without_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # info/eval need no training augmentation
    for name in ("t", "s", "b"):
        cfg = load_config(CONFIGS / f"paper/biformer-{name}.yaml")
        aug, optim = cfg["data"]["augment"], cfg["optim"]
        assert (aug["rand_augment"], aug["random_erasing"], aug["mixup"], aug["cutmix"]) == (
            "rand-m9-mstd0.5-inc1",
            0.25,
            0.8,
            1.0,
        )
        assert (optim["label_smoothing"], optim["ema_decay"]) == (0.1, 0.99996)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.augment.random_erasing=1.5", r"data.augment.random_erasing: a probability in \[0, 1\], got 1.5"),
        ("data.augment.mixup=-0.5", r"data.augment.mixup: the Beta\(α, α\) parameter must be >= 0"),
        ("data.augment.crop_scale=[0.5,0.2]", r"data.augment.crop_scale: expected \[min, max\]"),
        ("optim.label_smoothing=1.0", r"optim.label_smoothing: must be in \[0, 1\), got 1.0"),
        ("optim.ema_decay=-0.1", r"optim.ema_decay: must be in \[0, 1\), got -0.1"),
    ],
)
def test_recipe_values_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DIGITS, [override])


def test_mixup_needs_an_even_batch_and_lms_take_no_recipe():
    with pytest.raises(ConfigError, match="timm's Mixup needs an even data.batch_size, got 33"):
        load_config(DIGITS, ["data.batch_size=33", "data.augment.cutmix=1.0"])
    for key in ("label_smoothing", "ema_decay"):
        with pytest.raises(ConfigError, match=f"optim.{key}: implemented for image classification models only"):
            load_config(CONFIGS / "lm/gpt-tiny.yaml", [f"optim.{key}=0.1"])


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_label_smoothing_loss_on_hard_and_soft_targets():
    cfg = load_config(DIGITS, ["optim.label_smoothing=0.1", "model.num_classes=5"])
    module = ClassifierModule(cfg)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 1, 32, 32, generator=g)
    hard = torch.tensor([0, 3, 4, 1])
    soft = torch.softmax(torch.randn(4, 5, generator=g), -1)  # as mixup makes: rows sum to 1
    with torch.no_grad():
        logp = torch.log_softmax(module(images).double(), -1)  # [4, 5]
        for labels, target in ((hard, F.one_hot(hard, 5).double()), (soft, soft.double())):
            want = -(((1 - 0.1) * target + 0.1 / 5) * logp).sum(-1).mean()  # (1 - ε) y + ε / K
            got = module.training_step((images, labels), 0)
            assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_ema_of_weights_is_the_exponential_average_of_the_steps(tmp_path):
    d = 0.6
    out = fit(
        DIGITS, micro(tmp_path, **{"optim.ema_decay": d, "trainer.ckpt_every": 1, "trainer.keep_checkpoints": -1})
    )
    from arch.io import load_pretrained

    steps = [torch.load(p, weights_only=True)["state_dict"] for p in sorted((out["run_dir"] / "checkpoints").iterdir())]
    assert len(steps) == 3
    model = {k[6:] for k in steps[0] if k.startswith("model.")}
    ema = load_pretrained(out["run_dir"] / "model-ema").state_dict()
    for name in model:
        if not steps[0]["model." + name].is_floating_point():
            continue  # num_batches_tracked
        want = steps[0]["model." + name].double()  # the first update copies the weights after step 1
        for sd in steps[1:]:
            want = d * want + (1 - d) * sd["model." + name].double()
        torch.testing.assert_close(ema[name].double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(steps[-1]["ema.module." + name], ema[name])  # the last checkpoint holds it too
    assert not torch.equal(ema["head.weight"], steps[-1]["model.head.weight"])
    assert 0.0 <= out["val_ema_acc1"] <= out["val_ema_acc5"] <= 1.0


def test_full_deit_recipe_trains_with_timm(tmp_path, capsys):
    pytest.importorskip("timm")
    from train.datamodules import ImageDataModule

    extra = {f"data.augment.{k}": v for k, v in TIMM_OPTIONS.items()}
    extra.update({"optim.label_smoothing": 0.1, "optim.ema_decay": 0.9})
    cfg = load_config(DIGITS, micro(tmp_path, **extra))
    data = ImageDataModule(cfg)
    data.setup()
    data.trainer = type("T", (), {"training": True})()  # what Lightning sets while it trains
    x, y = next(iter(data.train_dataloader()))
    mixed, target = data.on_after_batch_transfer((x, y), 0)
    assert mixed.shape == x.shape and target.shape == (16, 10)
    torch.testing.assert_close(target.sum(-1), torch.ones(16))  # soft targets: a convex mix of two one-hots
    assert ((target > 0).sum(-1) <= 2).all() and (target.max(-1).values < 1).any()

    out = fit(DIGITS, micro(tmp_path, **extra))
    assert torch.isfinite(torch.tensor(out["val_loss"])) and 0.0 <= out["val_ema_acc1"] <= 1.0
    assert "validation of the EMA weights" in capsys.readouterr().out


def test_malformed_rand_augment_is_a_config_error_before_anything_is_written(tmp_path):
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match="data.augment.rand_augment: 'rnd-m9' is not a timm RandAugment config"):
        fit(DIGITS, micro(tmp_path, **{"data.augment.rand_augment": "rnd-m9"}))
    assert not (tmp_path / "runs").exists()


def test_smoothing_in_the_loss_equals_deits_smoothed_mixup_targets():
    """DeiT: timm's Mixup(label_smoothing=0.1) targets with SoftTargetCrossEntropy; ours: unsmoothed Mixup targets
    with cross_entropy(label_smoothing=0.1). Same draws (seeded), same loss."""
    pytest.importorskip("timm")
    import random

    import numpy as np
    from timm.data.mixup import Mixup
    from timm.loss import SoftTargetCrossEntropy

    from train.images import mixup

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 7, (8,), generator=g)
    logits = torch.randn(8, 7, generator=g, dtype=torch.float64)
    for seed in range(6):  # mixup and cutmix batches both occur
        random.seed(seed), np.random.seed(seed)
        _, theirs = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=7)(x.clone(), y)
        random.seed(seed), np.random.seed(seed)
        _, ours = mixup({"mixup": 0.8, "cutmix": 1.0}, 7)(x.clone(), y)
        want = SoftTargetCrossEntropy()(logits, theirs.double())
        torch.testing.assert_close(F.cross_entropy(logits, ours.double(), label_smoothing=0.1), want)


def test_a_pillow_that_rejects_timms_zero_bit_posterize_is_a_config_error(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    from PIL import ImageOps

    def posterize(img, bits):  # Pillow 13's check
        if not 1 <= bits <= 8:
            raise ValueError("bits must be between or equal to 1 and 8")
        return img

    monkeypatch.setattr(ImageOps, "posterize", posterize)
    with pytest.raises(ConfigError, match="timm's RandAugment posterizes to 0 bits, which Pillow .* rejects"):
        fit(DIGITS, micro(tmp_path, **{"data.augment.rand_augment": "rand-m9-mstd0.5-inc1"}))
    assert not (tmp_path / "runs").exists()
