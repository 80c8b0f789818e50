"""Pattention (TokenFormer's token-parameter attention): ``naive.py`` is the definition with the paper's
normalisation ablations (``norm``), ``triton.py`` the fused kernels (the [tokens × n] score matrix is never
written: forward in two passes, backward recomputes it), ``api.py`` the one entry, ``pattention``."""

from .api import pattention

__all__ = ["pattention"]
