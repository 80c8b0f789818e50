"""What the ops share: choosing an implementation (``impl``) and allocating the outputs of Triton launches.

* ``resolve_impl``: ``"auto"`` is Triton on CUDA tensors and the op's best PyTorch path elsewhere; ``"triton"``
  on CPU tensors runs the kernels in the Triton interpreter, which only works when ``TRITON_INTERPRET=1`` was
  set before triton was first imported (then every ``@triton.jit`` function is an interpreted one).
* ``empty``: every output a Triton launch writes is allocated here, so that tests can fill them with NaN first
  (``poisoned_outputs``) and an element a kernel forgets to write fails the comparison instead of passing by luck.

Imports only torch (triton lazily), as all of ``kernels``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

_POISON = False


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, or a NaN-filled (integers: -1) tensor inside ``poisoned_outputs()``."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if _POISON:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Within this block, outputs allocated for kernels start as NaN (tests: an unwritten element shows)."""
    global _POISON
    old, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = old


def triton_interpreted() -> bool:
    """Whether ``@triton.jit`` functions are interpreted in this process (TRITON_INTERPRET=1 at decoration)."""
    from .tl_util import INTERPRETED

    return INTERPRETED


def resolve_impl(
    op: str, impl: str, allowed: Sequence[str], device: torch.device, fallback: str, triton_reason: str | None = None
) -> str:
    """The implementation to run.

    op: name for messages; impl: the caller's choice; allowed: every valid choice ("auto" included);
    fallback: what "auto" runs when Triton does not apply (CPU tensors, or ``triton_reason`` is set);
    triton_reason: why the Triton kernels cannot take these inputs (e.g. a dtype), or None.
    """
    if impl not in allowed:
        raise ValueError(f"{op}: impl={impl!r} is not one of {', '.join(map(repr, allowed))}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_reason is None and _has_triton() else fallback
    if impl == "triton":
        if triton_reason is not None:
            raise ValueError(f"{op}: impl='triton' {triton_reason}; use impl='auto' or a PyTorch impl")
        if not _has_triton():
            raise RuntimeError(f"{op}: impl='triton' needs the triton package, which is not installed")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"{op}: impl='triton' on {device.type} tensors runs only in the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is first imported (tests/conftest.py does), or move the "
                "tensors to a CUDA device, or use impl='auto'"
            )
    return impl


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
