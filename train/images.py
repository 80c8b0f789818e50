"""Image classification data: sources, batched augmentation in plain torch, the Lightning DataModule.

Sources (``data.source``, same registry as the text sources):

* ``digits`` (offline default): scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes),
  upsampled to ``image_size``; a fixed, seeded ``val_fraction`` of the images is held out.
* ``hf_images``: any Hugging Face image dataset by name (``cifar10``, ``imagenet-1k``, a local
  ``imagefolder``...), images resized to ``image_size``; needs the network unless the data is local.

Augmentation (``data.augment``, training batches only): random resized crop (area fraction in ``crop_scale``,
aspect ratio in [3/4, 4/3]) and optional horizontal flip, applied per image to whole batches with
``affine_grid``/``grid_sample``, then per-channel normalisation.
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
