"""Triton helpers shared by the ops' kernels (imported only by the ``triton.py`` modules).

* ``INTERPRETED``: whether ``@triton.jit`` functions run in the Triton interpreter in this process
  (``TRITON_INTERPRET=1`` when triton was imported);
* ``autotune``: ``triton.autotune`` over GPU configs; only the first config under the interpreter (which would
  run every candidate, and whose timings mean nothing) or with ``KERNELS_AUTOTUNE=0`` (tests on a GPU: one
  compile per kernel variant instead of one per config);
* ``dot`` and ``f32_dot``: ``tl.dot`` with fp32 accumulation. Operands are fed in their own 16-bit type on GPUs
  (tensor cores); fp32 operands use IEEE fp32 products; bf16 operands are widened to fp32 first under the
  interpreter, whose bf16 arithmetic is wrong (fp16 is exact there, so fp16 tests run the GPU path).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)
AUTOTUNE = not INTERPRETED and os.environ.get("KERNELS_AUTOTUNE", "1") != "0"


def autotune(configs: list[triton.Config], key: list[str]):
    return triton.autotune(configs=configs if AUTOTUNE else configs[:1], key=key)


def unit_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a unit stride along its last dim (kernels address rows by their other strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def f32_dot(dtype: torch.dtype) -> bool:
    """Whether kernels on ``dtype`` operands multiply in fp32 (the ``F32`` constexpr of ``dot``)."""
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)


@triton.jit
def dot(a, b, F32: tl.constexpr):
    """a @ b with an fp32 result; ``F32``: widen both operands to fp32 first (IEEE products)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)
