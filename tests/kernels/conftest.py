"""Shared by the kernel tests: the device, per-dtype tolerances, and a table of the largest errors seen.

Kernels are tested on CUDA when a GPU is present (compiled), else on CPU in the Triton interpreter
(``TRITON_INTERPRET=1``, set by tests/conftest.py before triton is imported). Every comparison goes through
``check``, which records the error; the largest per (op, impl, dtype) are printed at the end of the run.
"""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (impl, dtype) pairs: fp32 and bf16 for every impl; fp16 for Triton too (under the interpreter, fp16 runs the
# kernels' GPU code path of 16-bit tensor-core operands, which bf16 cannot: see kernels/tl_util.py)
IMPL_DTYPES = [(i, d) for i in ("torch", "triton") for d in (FP32, BF16)] + [("triton", FP16)]
# max |a - b| / max(1, max |b|), b computed in float64 from the same (rounded) inputs: the rounding of the inputs
# is shared, what is left is the implementation's arithmetic (bf16: 8-bit mantissa products and outputs). Inputs
# are O(1), so below 1 the bound is absolute (a gradient that is exactly 0 in exact arithmetic, e.g. dq of a
# query that sees one key, is then held to the tolerance, not to a ratio of rounding errors).
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
ERRORS: dict[tuple[str, str, str], float] = {}


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1.0) -> float:
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(max(floor, 1e-30))).item()


def check(
    op: str, impl: str, dtype: torch.dtype, what: str, a: torch.Tensor, b: torch.Tensor, floor: float = 1.0
) -> None:
    """Assert a ≈ b within TOL[dtype] (``rel_err``; ``floor=0``: relative to max |b| however small), NaN-free,
    and record the error."""
    assert a.shape == b.shape, f"{op} {impl} {what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{op} {impl} {what}: non-finite values (an unwritten output element?)"
    err = rel_err(a, b, floor)
    key = (op, impl, str(dtype).removeprefix("torch."))
    ERRORS[key] = max(ERRORS.get(key, 0.0), err)
    assert err <= TOL[dtype], f"{op} impl={impl} {dtype} {what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def pytest_terminal_summary(terminalreporter):
    if not ERRORS:
        return
    tr = terminalreporter
    tr.section(f"kernel errors: largest rel_err over outputs and gradients (tests/kernels/conftest.py), {DEVICE}")
    for (op, impl, dtype), err in sorted(ERRORS.items()):
        tr.write_line(f"{op:24s} {impl:8s} {dtype:9s} {err:.1e}  (tolerance {TOL[getattr(torch, dtype)]:.0e})")


@pytest.fixture
def device() -> str:
    return DEVICE
