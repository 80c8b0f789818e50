"""kernels: the ops every block computes through, each with a definition, PyTorch paths and Triton kernels.

Three ops, one subpackage each, each re-exporting one public entry (``api.py``) that checks its arguments
(``ValueError`` naming what is wrong) and dispatches on ``impl``:

* ``block_sparse.block_sparse_attention(q, k, v, kv_blocks, *, block_size, q_block_size, causal, token_mask,
  key_mask, scale, impl)``: softmax attention over the key blocks a selector chose (2-D and 1-D causal BRA,
  DHSA, fixed block-sparse). impl ``naive`` (dense mask), ``torch`` (chunked / per-query / forward-only
  PyTorch paths, chosen per call), ``triton`` (FlashAttention-style forward, dk/dv through transposed tile
  lists, dq in its own pass, over tile metadata built once per selection: ``block_sparse/metadata.py``).
* ``pattention.pattention(x, key, value, tau, *, norm, impl)``: TokenFormer's token-parameter attention;
  ``norm`` ``l2_gelu`` (Eq. 5), ``l1_gelu``, ``softmax``. impl ``naive``, ``triton`` (fused, l2/l1: the
  [tokens × n] scores are never written, recomputed in the backward pass).
* ``routed_ffn.routed_ffn(x, route, small, big, *, residual, impl)``: Duo-LLM hard routing over SwiGLU modules.
  impl ``naive`` (every module on every token), ``torch`` (sort / gather / compute / scatter), ``triton``
  (grouped GEMMs per module, scatter and residual add fused).

``impl="auto"`` (the default everywhere) is ``triton`` on CUDA tensors and the best PyTorch path on CPU
(``torch``; ``naive`` for pattention); ``"triton"`` on CPU tensors runs the same kernels in the Triton
interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported (how the tests run them), and
raises otherwise. ``common.py``: the impl choice and output allocation (NaN-poisoned in tests); ``tl_util.py``:
Triton helpers; ``bench/``: the measurement harness and ``python -m kernels.bench``.

This package imports only torch and triton (triton lazily, when a Triton impl is chosen).
"""
