"""Block-sparse attention: the one sparse-attention routine that every key selector uses.

A selector (2-D BRA, 1-D causal BRA, DHSA, fixed block-sparse) decides, for each block of queries, which key
blocks it may see, plus optionally which of those each query inside the block may see; this package computes
softmax attention restricted to exactly those keys, through one entry, ``block_sparse_attention`` (``api.py``):

* ``naive.py``: the definition (a dense boolean mask, then masked softmax), ``impl="naive"``;
* ``pytorch.py``: ``impl="torch"``, dispatching per call among ``chunked.py`` (memory-frugal training path),
  ``per_query.py`` (``q_block_size=1``) and ``inference.py`` (forward only, one selection for all heads);
* ``triton.py`` + ``metadata.py``: ``impl="triton"``, FlashAttention-style kernels over the selected key tiles
  (forward, dk/dv through the transposed tile lists, dq in its own pass), and the per-selection tile lists.
"""

from .api import block_sparse_attention

__all__ = ["block_sparse_attention"]
