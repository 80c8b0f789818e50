"""Image classification data: sources, batched augmentation in plain torch, the Lightning DataModule.

Sources (``data.source``, same registry as the text sources):

* ``digits`` (offline default): scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes),
  upsampled to ``image_size``; a fixed, seeded ``val_fraction`` of the images is held out.
* ``hf_images``: any Hugging Face image dataset by name (``cifar10``, ``imagenet-1k``, a local
  ``imagefolder``...), images resized to ``image_size``; needs the network unless the data is local.

Augmentation (``data.augment``, training batches only): random resized crop (area fraction in ``crop_scale``,
aspect ratio in [3/4, 4/3]) and optional horizontal flip, applied per image to whole batches with
``affine_grid``/``grid_sample``, then per-channel normalisation. The rest of DeiT's recipe (which the paper image
configs use) comes from timm (``pip install '.[vision]'``), each off by default:

* ``rand_augment``: timm's RandAugment config string (DeiT: ``rand-m9-mstd0.5-inc1``), per image on the CPU in
  the loader, on the resized image *before* the batched random crop (DeiT: after it);
* ``random_erasing``: timm's ``RandomErasing`` probability per image (DeiT: 0.25, per-pixel normal noise, one box),
  on the normalised batch;
* ``mixup`` / ``cutmix``: the Beta(α, α) of timm's ``Mixup`` (DeiT: 0.8 / 1.0; with both, each batch is one or the
  other with probability 1/2; every batch is mixed); labels become soft targets ``[B, classes]``.

Label smoothing (``optim.label_smoothing``) and the EMA of weights (``optim.ema_decay``) are torch's own (the loss and
``torch.optim.swa_utils.AveragedModel``, see ``train.module.ClassifierModule``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from arch.registry import ConfigError

from .data import SOURCES

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclasses.dataclass
class AugmentConfig:
    crop_scale: list[float] = dataclasses.field(default_factory=lambda: [0.08, 1.0])  # area fraction kept
    hflip: bool = True
    rand_augment: Optional[str] = None  # timm RandAugment config, e.g. "rand-m9-mstd0.5-inc1" (DeiT); needs timm
    random_erasing: float = 0.0  # probability per image (DeiT 0.25); needs timm
    mixup: float = 0.0  # mixup Beta(α, α) (DeiT 0.8); needs timm
    cutmix: float = 0.0  # cutmix Beta(α, α) (DeiT 1.0); needs timm


TIMM_OPTIONS = ("rand_augment", "random_erasing", "mixup", "cutmix")


def check_augment(augment: dict, batch_size: int) -> None:
    """Value checks of ``data.augment`` (config validation; timm is not needed for them)."""
    lo, hi = augment["crop_scale"] if len(augment["crop_scale"]) == 2 else (-1.0, -1.0)
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.augment.crop_scale: expected [min, max] with 0 < min <= max <= 1, got {[lo, hi]}")
    if not 0 <= augment["random_erasing"] <= 1:
        raise ConfigError(f"data.augment.random_erasing: a probability in [0, 1], got {augment['random_erasing']}")
    for key in ("mixup", "cutmix"):
        if augment[key] < 0:
            raise ConfigError(
                f"data.augment.{key}: the Beta(α, α) parameter must be >= 0 (0 = off), got {augment[key]}"
            )
    if (augment["mixup"] or augment["cutmix"]) and batch_size % 2:
        raise ConfigError(f"data.augment.mixup/cutmix: timm's Mixup needs an even data.batch_size, got {batch_size}")


def require_timm(augment: dict) -> None:
    """ConfigError unless timm imports, when an option of ``data.augment`` needs it (checked before a run writes)."""
    used = [key for key in TIMM_OPTIONS if augment[key]]
    if not used:
        return
    try:
        import timm.data  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"data.augment.{used[0]} needs timm ({e}); install it with: pip install '.[vision]' "
            f"(or set {', '.join(f'data.augment.{k}' for k in used)} off)"
        ) from None
    if augment["rand_augment"]:
        rand_augment(augment["rand_augment"], [0.5], 32)  # a malformed config string fails here
        check_posterize()


def check_posterize() -> None:
    """timm's RandAugment posterizes to 0 bits at magnitude 10 (reached with ``mstd`` noise); Pillow 13 rejects 0
    bits (Pillow <= 12 returns a black image, which DeiT trained with), so such a run would crash at a random step."""
    from PIL import Image, __version__
    from timm.data.auto_augment import posterize

    try:
        posterize(Image.new("L", (1, 1)), 0)
    except ValueError as e:
        raise ConfigError(
            f"data.augment.rand_augment: timm's RandAugment posterizes to 0 bits, which Pillow {__version__} rejects "
            f"({e}); install Pillow < 13 (pip install '.[vision]' pins it)"
        ) from None


def rand_augment(config: str, mean: list[float], image_size: int):
    """timm's RandAugment transform (PIL -> PIL) with the hyper-parameters of timm's ``create_transform``: translations
    up to 0.45 of the image size, the mean colour as fill."""
    from timm.data.auto_augment import rand_augment_transform

    fill = tuple(min(255, round(255 * m)) for m in mean)
    hparams = {"translate_const": int(image_size * 0.45), "img_mean": fill if len(fill) == 3 else fill[0]}
    try:
        return rand_augment_transform(config, hparams)
    except Exception as e:  # timm raises assertion/key/value errors for a malformed config string
        raise ConfigError(f"data.augment.rand_augment: {config!r} is not a timm RandAugment config ({e!r})") from None


def to_pil(x: torch.Tensor):
    """[C, S, S] float in [0, 1] -> a PIL image (mode L for one channel, RGB for three)."""
    from PIL import Image

    a = x.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # [S, S, C]
    return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)


def from_pil(img) -> torch.Tensor:
    """A PIL image -> [C, S, S] float in [0, 1]."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float().div_(255)
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


class RandAugmented(Dataset):
    """A dataset of (image [C, S, S] in [0, 1], label) with timm's RandAugment applied to each image (in PIL)."""

    def __init__(self, ds: Dataset, config: str, mean: list[float], image_size: int):
        self.ds, self.transform = ds, rand_augment(config, mean, image_size)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        x, y = self.ds[i]
        return from_pil(self.transform(to_pil(x))), y


def random_erasing(prob: float, device: torch.device):
    """timm's RandomErasing as DeiT uses it: per-pixel normal noise, one box per image, on normalised batches."""
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability=prob, mode="pixel", max_count=1, device=str(device))


def mixup(augment: dict, num_classes: int):
    """timm's Mixup with DeiT's settings (every batch mixed, mixup or cutmix with probability 1/2 when both are on),
    without label smoothing (the loss applies it: ``cross_entropy(label_smoothing=)``, the same targets)."""
    from timm.data.mixup import Mixup

    return Mixup(
        mixup_alpha=augment["mixup"],
        cutmix_alpha=augment["cutmix"],
        prob=1.0,
        switch_prob=0.5,
        mode="batch",
        label_smoothing=0.0,
        num_classes=num_classes,
    )


@SOURCES.register("digits")
class DigitsSource:
    """scikit-learn's 8×8 digits (UCI optdigits test set), one channel, upsampled bilinearly."""

    task = "classification"

    def __init__(self, *, image_size: int = 32, val_fraction: float = 0.2, split_seed: int = 0):
        self.image_size, self.val_fraction, self.split_seed = image_size, val_fraction, split_seed
        self.num_classes, self.channels = 10, 1

    def load(self) -> dict[str, Dataset]:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ConfigError("data.source: 'digits' needs scikit-learn; run: pip install scikit-learn") from None
        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
        x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        y = torch.tensor(d.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = int(len(y) * self.val_fraction)
        val, tr = perm[:n_val], perm[n_val:]
        self.mean, self.std = [x[tr].mean().item()], [x[tr].std().item()]
        return {"train": TensorDataset(x[tr], y[tr]), "validation": TensorDataset(x[val], y[val])}


class HFImages(Dataset):
    """A Hugging Face image dataset as (image [C, S, S] float in [0, 1], label) pairs."""

    def __init__(self, ds, image_field: str, label_field: str, size: int, channels: int):
        self.ds, self.image_field, self.label_field, self.size, self.channels = (
            ds,
            image_field,
            label_field,
            size,
            channels,
        )

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        row = self.ds[int(i)]
        img = row[self.image_field].convert("RGB" if self.channels == 3 else "L")
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float().div_(255)  # [H, W(, C)]
        x = x.permute(2, 0, 1) if x.ndim == 3 else x[None]
        # resize the short side to `size`, centre crop (train batches are then re-cropped by augmentation)
        h, w = x.shape[1:]
        s = self.size / min(h, w)
        x = F.interpolate(
            x[None],
            size=(max(self.size, round(h * s)), max(self.size, round(w * s))),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0]
        top, left = (x.shape[1] - self.size) // 2, (x.shape[2] - self.size) // 2
        return x[:, top : top + self.size, left : left + self.size], int(row[self.label_field])


@SOURCES.register("hf_images")
class HFImageSource:
    """``datasets.load_dataset(name, config_name, data_dir=..., split=...)`` with an image and a label column."""

    task = "classification"

    def __init__(
        self,
        *,
        name: str,
        config_name: Optional[str] = None,
        data_dir: Optional[str] = None,
        split: str = "train",
        val_split: str = "validation",
        image_field: str = "image",
        label_field: str = "label",
        image_size: int = 224,
        channels: int = 3,
    ):
        self.name, self.config_name, self.data_dir = name, config_name, data_dir
        self.splits = {"train": split, "validation": val_split}
        self.image_field, self.label_field, self.image_size, self.channels = (
            image_field,
            label_field,
            image_size,
            channels,
        )
        self.mean, self.std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ([0.5], [0.5])

    def load(self) -> dict[str, Dataset]:
        import datasets

        out = {}
        for split, name in self.splits.items():
            ds = datasets.load_dataset(self.name, self.config_name, data_dir=self.data_dir, split=name)
            for key in ("image_field", "label_field"):
                if getattr(self, key) not in ds.column_names:
                    raise ConfigError(
                        f"data.source.{key}: {getattr(self, key)!r} is not a column of {self.name}; "
                        f"allowed values: {', '.join(ds.column_names)}"
                    )
            out[split] = HFImages(ds, self.image_field, self.label_field, self.image_size, self.channels)
        feature = out["train"].ds.features[self.label_field]
        self.num_classes = getattr(feature, "num_classes", None) or len(set(out["train"].ds[self.label_field]))
        return out


def random_resized_crop(x: torch.Tensor, scale: list[float], hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per-image random crop of area fraction in ``scale`` and aspect in [3/4, 4/3], resized back to the input
    size, optionally mirrored. x: [B, C, H, W] -> same shape."""
    B = x.shape[0]
    u = torch.rand(4, B, generator=gen)
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    aspect = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
    sw, sh = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)  # crop size / image size
    cx, cy = (1 - sw) * (2 * u[2] - 1), (1 - sh) * (2 * u[3] - 1)  # crop centre, in [-1, 1] coordinates
    flip = torch.where(torch.rand(B, generator=gen) < 0.5, -1.0, 1.0) if hflip else torch.ones(B)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw * flip, cx, sh, cy
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
