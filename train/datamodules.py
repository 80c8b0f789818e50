"""The Lightning data modules: language-model windows and image classification batches.

The data itself (sources, tokenizers, token caches, windows, image sources and augmentation) lives in
``train.data`` and ``train.images``, which import no Lightning.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from arch.registry import ConfigError

from .data import SOURCES, TrainWindows, ValWindows, build_tokenizer, load_tokens
from .images import random_resized_crop


class LMDataModule(L.LightningDataModule):
    def __init__(self, cfg: dict, full_validation: bool = False):
        super().__init__()
        self.cfg, self.data_cfg = cfg, cfg["data"]
        self.full_validation = full_validation
        self.tokenizer = build_tokenizer(self.data_cfg["tokenizer"])
        if self.tokenizer.vocab_size > cfg["model"]["vocab_size"]:
            raise ConfigError(
                f"model.vocab_size: {cfg['model']['vocab_size']} is smaller than the tokenizer's vocabulary "
                f"({self.tokenizer.vocab_size}); set model.vocab_size >= {self.tokenizer.vocab_size}"
            )
        self.splits: dict | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = load_tokens(self.data_cfg, self.tokenizer)
            # a seq_len longer than either split fails here, before a run starts, not at its first batch
            T = self.data_cfg["seq_len"]
            TrainWindows(self.splits["train"]["tokens"], T, 1, self.cfg["seed"], 0, 0)
            ValWindows(self.splits["validation"]["tokens"], T)

    @property
    def bytes_per_token(self) -> float:
        self.setup()
        return self.splits["validation"]["bytes_per_token"]

    def train_dataloader(self) -> DataLoader:
        tr = self.cfg["trainer"]
        accum = tr["accumulate_grad_batches"]
        trainer = self.trainer
        done = trainer.global_step * accum if trainer is not None else 0  # micro-batches already trained (resume)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        ds = TrainWindows(
            self.splits["train"]["tokens"],
            self.data_cfg["seq_len"],
            self.data_cfg["batch_size"],
            self.cfg["seed"],
            done,
            tr["max_steps"] * accum,
            rank,
            world,
        )
        return DataLoader(ds, batch_size=None, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        B, vb = self.data_cfg["batch_size"], self.data_cfg["val_batches"]
        max_windows = None if self.full_validation or vb is None else vb * B
        ds = ValWindows(self.splits["validation"]["tokens"], self.data_cfg["seq_len"], max_windows)
        return DataLoader(ds, batch_size=B, shuffle=False)


class ImageDataModule(L.LightningDataModule):
    """Shuffled training batches (seeded), augmented after transfer to the device; normalised val batches."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg, self.data_cfg = cfg, cfg["data"]
        self.source = SOURCES.create(self.data_cfg["source"])
        self.augment = self.data_cfg["augment"]
        self.splits: dict | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self.source.load()
            if self.source.num_classes > self.cfg["model"]["num_classes"]:
                raise ConfigError(
                    f"model.num_classes: {self.cfg['model']['num_classes']} is smaller than the "
                    f"{self.source.num_classes} classes of the data"
                )
            self._gen = torch.Generator().manual_seed(self.cfg["seed"])

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.cfg["seed"])
        return DataLoader(
            self.splits["train"],
            batch_size=self.data_cfg["batch_size"],
            shuffle=True,
            drop_last=True,
            generator=g,
            num_workers=self.data_cfg["num_workers"],
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.splits["validation"], batch_size=self.data_cfg["batch_size"], num_workers=self.data_cfg["num_workers"]
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch  # [B, C, S, S] in [0, 1], [B]
        if self.trainer is not None and self.trainer.training:
            x = random_resized_crop(x, self.augment["crop_scale"], self.augment["hflip"], self._gen)
        mean = torch.tensor(self.source.mean, device=x.device)[:, None, None]
        std = torch.tensor(self.source.std, device=x.device)[:, None, None]
        return (x - mean) / std, y
