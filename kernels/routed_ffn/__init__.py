"""DuoFFN's hard routing (each token through SKIP, the small or the big SwiGLU module): ``naive.py`` is the
definition, ``pytorch.py`` the sort/gather/compute/scatter path, ``triton.py`` grouped GEMMs per module with the
scatter and residual add fused, ``api.py`` the one entry, ``routed_ffn`` (weights as ``SwiGLUWeights``)."""

from .api import routed_ffn
from .naive import SwiGLUWeights

__all__ = ["routed_ffn", "SwiGLUWeights"]
