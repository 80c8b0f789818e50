"""kernels: Triton GPU kernels, each beside a plain-PyTorch reference and an autograd.Function.

Every op lives in its own subpackage with ``reference.py`` (the definition of correct), the Triton
implementation, and one public entry that dispatches (Triton on CUDA, the reference on CPU). This package
imports only torch and triton.
"""
