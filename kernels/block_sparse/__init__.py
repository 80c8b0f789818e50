"""Block-sparse attention: the one sparse-attention routine that every key selector uses.

A selector (2-D BRA, 1-D causal BRA, DHSA, fixed block-sparse) decides, for each block of queries, which key
blocks it may see, plus optionally which of those each query inside the block may see; this package computes
softmax attention restricted to exactly those keys, through one entry, ``block_sparse_attention`` (``api.py``):

* ``naive.py``: the definition (a dense boolean mask, then masked softmax), ``impl="naive"``;
* ``pytorch.py``: ``impl="torch"``, forward and backward, tiling the work per call by query block
  (``chunked.py``) or by key block (``per_query.py``: ``q_block_size=1`` and sparse per-token masks), every tile
  through ``tiles.py`` (PyTorch's fused CPU flash-attention kernel, with the row log-sum-exp);
* ``triton.py`` + ``metadata.py``: ``impl="triton"``, FlashAttention-style kernels over the selected key tiles
  (forward, dk/dv through the transposed tile lists, dq in its own pass), and the per-selection tile lists.
"""

from .api import block_sparse_attention

__all__ = ["block_sparse_attention"]
