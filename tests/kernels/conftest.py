"""Shared by the kernel tests: the device, per-dtype tolerances, and a table of the largest errors seen.

Kernels are tested on CUDA when a GPU is present (compiled), else on CPU in the Triton interpreter
(``TRITON_INTERPRET=1``, set by tests/conftest.py before triton is imported). Every comparison goes through
``check``, which records the error; the largest per (op, impl, dtype) are printed at the end of the run.
"""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# max |a - b| / max(1, max |b|), b computed in float64 from the same (rounded) inputs: the rounding of the inputs
# is shared, what is left is the implementation's arithmetic (bf16: 8-bit mantissa products and outputs). Inputs
# are O(1), so below 1 the bound is absolute (a gradient that is exactly 0 in exact arithmetic, e.g. dq of a
# query that sees one key, is then held to the tolerance, not to a ratio of rounding errors).
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
ERRORS: dict[tuple[str, str, str], float] = {}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def check(op: str, impl: str, dtype: torch.dtype, what: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Assert a ≈ b within TOL[dtype] (``rel_err``), NaN-free, and record the error."""
    assert a.shape == b.shape, f"{op} {impl} {what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{op} {impl} {what}: non-finite values (an unwritten output element?)"
    err = rel_err(a, b)
    key = (op, impl, str(dtype).removeprefix("torch."))
    ERRORS[key] = max(ERRORS.get(key, 0.0), err)
    assert err <= TOL[dtype], f"{op} impl={impl} {dtype} {what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def pytest_terminal_summary(terminalreporter):
    if not ERRORS:
        return
    tr = terminalreporter
    tr.section(f"kernel errors (max |a-b| / max(1, max |ref|) over outputs and gradients; device {DEVICE})")
    for (op, impl, dtype), err in sorted(ERRORS.items()):
        tr.write_line(f"{op:24s} {impl:8s} {dtype:9s} {err:.1e}  (tolerance {TOL[getattr(torch, dtype)]:.0e})")


@pytest.fixture
def device() -> str:
    return DEVICE
