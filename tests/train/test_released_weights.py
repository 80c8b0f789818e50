"""``eval``/``info --weights``: a checkpoint in the released BiFormer format (names and shapes of rayleizhu/BiFormer,
saved as ``{"model": state_dict, "epoch", "args"}``) evaluates to the loss of an independent functional forward of
the released model; wrong keys, shapes, kinds and files are clear errors."""

import argparse
import datetime

import pytest
import torch
import torch.nn.functional as F

from train.cli import main
from train.evaluate import evaluate
from train.images import DigitsSource

from ..arch.test_biformer import released_forward, released_state_dict
from ..conftest import CONFIGS

DIGITS = str(CONFIGS / "vision/biformer-tiny-digits.yaml")
DEPTHS, DIMS, TOPKS = [1, 1, 2, 1], [16, 32, 48, 64], [1, 2, 3, "all"]
SMALL = [
    f"model.depths={DEPTHS}",
    f"model.dims={DIMS}",
    "model.topks=[1,2,3,all]",
    "model.head_dim=8",
    "data.source.val_fraction=0.05",  # 89 held-out digits
    "data.batch_size=32",
]


def save_released(path, sd, **extra):
    """As the released training script saves: fp32 tensors under 'model', beside non-tensor entries."""
    torch.save({"model": {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, **extra}, path)
    return str(path)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    sd = released_state_dict(DEPTHS, DIMS, num_classes=10, in_chans=1, gen=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("released") / "biformer_digits.pth"
    return sd, save_released(path, sd, epoch=299, args=argparse.Namespace(lr=5e-4, model="biformer_tiny"))


def test_eval_with_released_weights_gives_the_released_models_loss(released, capsys):
    sd, path = released
    got = evaluate(DIGITS, SMALL, weights=path)
    src = DigitsSource(image_size=32, val_fraction=0.05)
    x, y = src.load()["validation"].tensors  # [89, 1, 32, 32], [89]
    x = ((x - src.mean[0]) / src.std[0]).double()
    logits = released_forward({k: v.float().double() for k, v in sd.items()}, x, DEPTHS, TOPKS, n_win=2, head_dim=8)
    want_loss = F.cross_entropy(logits, y).item()
    want_acc1 = (logits.argmax(-1) == y).double().mean().item()
    assert got["images"] == 89
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert abs(got["acc1"] - want_acc1) <= 1 / 89 + 1e-9  # fp32 vs fp64: at most one near-tie may flip
    out = capsys.readouterr().out
    assert f"val loss {got['loss']:.4f}" in out and "loaded strictly" in out


def test_info_with_released_weights_counts_what_loaded(released, capsys):
    sd, path = released
    assert main(["info", DIGITS, *SMALL, "--weights", path]) == 0
    n_params = sum(v.numel() for k, v in sd.items() if "running_" not in k and "num_batches" not in k)
    assert f"{len(sd)} tensors, {n_params:,} parameters" in capsys.readouterr().out


def test_released_weights_that_do_not_fit_are_clear_errors(tmp_path, capsys):
    wide = released_state_dict(DEPTHS, [16, 32, 48, 80], num_classes=10, in_chans=1, device="meta")
    wide = {k: torch.zeros(v.shape) for k, v in wide.items()}
    assert main(["eval", DIGITS, *SMALL, "--weights", save_released(tmp_path / "wide.pth", wide)]) == 2
    err = capsys.readouterr().err
    assert "weights do not fit the model of the config" in err
    assert "shape mismatch: downsample.3.0.weight (80, 48, 3, 3) in the file, (64, 48, 3, 3) in the model" in err

    sd = released_state_dict(DEPTHS, DIMS, num_classes=10, in_chans=1, gen=torch.Generator().manual_seed(0))
    extra = save_released(tmp_path / "extra.pth", {**sd, "stages.0.0.attn.router.emb.weight": torch.zeros(2)})
    assert main(["info", DIGITS, *SMALL, "--weights", extra]) == 2
    assert "stages.0.0.attn.router.emb.weight" in capsys.readouterr().err

    missing = save_released(tmp_path / "missing.pth", {k: v for k, v in sd.items() if k != "head.bias"})
    assert main(["info", DIGITS, *SMALL, "--weights", missing]) == 2
    assert "missing: head.bias" in capsys.readouterr().err


def test_released_weights_of_other_kinds_and_files_are_clear_errors(released, tmp_path, capsys):
    _, path = released
    assert main(["info", str(CONFIGS / "lm/gpt-tiny.yaml"), "--weights", path]) == 2
    assert "released checkpoints load for model.kind biformer; this config's model.kind is 'lm'" in (
        capsys.readouterr().err
    )
    assert main(["info", DIGITS, "--weights", str(tmp_path / "nope.pth")]) == 2
    assert "no such file" in capsys.readouterr().err
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": {}, "saved_at": datetime.datetime(2023, 3, 1)}, unsafe)
    assert main(["info", DIGITS, "--weights", str(unsafe)]) == 2
    assert "cannot be read with weights_only=True" in capsys.readouterr().err
    not_weights = tmp_path / "list.pth"
    torch.save({"model": {"a": 1}}, not_weights)
    assert main(["info", DIGITS, "--weights", str(not_weights)]) == 2
    assert "expected a state dict or a dict with a 'model' state dict" in capsys.readouterr().err
