"""BiFormer backbone (Zhu et al., CVPR 2023, Sec. 3.3 and Table 1; released code: models/biformer.py).

Two-conv stem (stride 4), four stages separated by 3×3 stride-2 conv downsampling; each block is
``x + dwconv3x3(x)`` (positional encoding), then pre-norm ``x + BRA(LN(x))`` and ``x + MLP(LN(x))`` (ratio 3);
final BatchNorm, global average pooling, linear classifier. ``forward(images [B, C, H, W]) -> logits [B, classes]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from kernels.block_sparse.api import Impl

from .bra import BiLevelRoutingAttention, TopK
from .registry import MODELS, ConfigError, check_fields, fields_of_dataclass


@dataclasses.dataclass
class BiFormerConfig:
    """Keys of a BiFormer config (``kind: biformer``). Paper: T = depths 2,2,8,2, dims 64,128,256,512;
    S = 4,4,18,4, same dims; B = 4,4,18,4, dims 96,192,384,768; all with topks 1,4,16,all and n_win 7."""

    kind: Literal["biformer"] = "biformer"
    num_classes: int = 1000
    in_chans: int = 3
    image_size: int = 224  # the size `python -m train info` counts FLOPs at; any size runs
    depths: list[int] = dataclasses.field(default_factory=lambda: [2, 2, 8, 2])
    dims: list[int] = dataclasses.field(default_factory=lambda: [64, 128, 256, 512])
    topks: list[TopK] = dataclasses.field(default_factory=lambda: [1, 4, 16, "all"])
    n_win: int = 7
    head_dim: int = 32
    mlp_ratio: float = 3.0
    scale: Literal["head_dim", "dim"] = "head_dim"  # "dim": the released code's dim**-0.5
    drop_path: float = 0.0  # stochastic depth rate at the last block (linear in depth), 0.1 for T in the paper
    impl: Impl = "auto"  # kernels.block_sparse implementation of the BRA blocks


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop the residual branch of a whole sample with probability p."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *[1] * (x.ndim - 1), device=x.device) >= self.p
        return x * keep / (1 - self.p)


class Block(nn.Module):
    def __init__(self, dim: int, topk: TopK, c: dict, drop_path: float):
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = BiLevelRoutingAttention(
            dim, n_win=c["n_win"], topk=topk, head_dim=c["head_dim"], scale=c["scale"], impl=c["impl"]
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(c["mlp_ratio"] * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        x = (x + self.pos(x)).permute(0, 2, 3, 1)  # [B, H, W, C]
        x = x + self.drop(self.attn(self.norm1(x)))
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


@MODELS.register("biformer")
class BiFormer(nn.Module):
    task = "classification"

    def __init__(self, cfg: Mapping):
        super().__init__()
        c = check_fields(cfg, fields_of_dataclass(BiFormerConfig), "model")
        for key in ("depths", "dims", "topks"):
            if len(c[key]) != 4:
                raise ConfigError(f"model.{key}: expected 4 values (one per stage), got {c[key]}")
        self.config = c
        d = c["dims"]
        down = [
            nn.Sequential(
                nn.Conv2d(c["in_chans"], d[0] // 2, 3, 2, 1),
                nn.BatchNorm2d(d[0] // 2),
                nn.GELU(),
                nn.Conv2d(d[0] // 2, d[0], 3, 2, 1),
                nn.BatchNorm2d(d[0]),
            )
        ]
        down += [nn.Sequential(nn.Conv2d(d[i], d[i + 1], 3, 2, 1), nn.BatchNorm2d(d[i + 1])) for i in range(3)]
        self.downsample = nn.ModuleList(down)
        n = sum(c["depths"])
        rates = [c["drop_path"] * i / max(n - 1, 1) for i in range(n)]
        stages, i = [], 0
        for s in range(4):
            try:
                blocks = [Block(d[s], c["topks"][s], c, rates[i + j]) for j in range(c["depths"][s])]
            except ConfigError as e:
                raise ConfigError(f"model.topks[{s}] / model.dims[{s}]: {e}") from None
            stages.append(nn.Sequential(*blocks))
            i += c["depths"][s]
        self.stages = nn.ModuleList(stages)
        self.norm = nn.BatchNorm2d(d[-1])
        self.head = nn.Linear(d[-1], c["num_classes"])
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:  # released code: trunc_normal(0.02) linears, zero biases
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images  # [B, C, H, W]
        for down, stage in zip(self.downsample, self.stages):
            x = stage(down(x))  # [B, d_s, H / 2^(s+2), W / 2^(s+2)]
        return self.head(self.norm(x).mean((2, 3)))  # [B, classes]
