"""One training step of the tiny configs through the Triton kernels (``impl: triton``; the interpreter on CPU)
gives the loss and gradients of the PyTorch paths (what ``impl: auto`` runs on CPU)."""

import pytest
import torch
import torch.nn.functional as F

from arch import build_model
from train.config import load_config

from ..conftest import CONFIGS
from .conftest import DEVICE, check

SHRINK = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2"]
MODELS = {  # config: (size overrides, the impl keys, the PyTorch impl = what auto runs on CPU)
    "bra-tiny": (["model.max_seq_len=48"], ["model.mixer.impl"], "torch"),  # 3 regions of 16, top-2
    "dhsa-tiny": (
        [
            "model.max_seq_len=64",
            "model.mixer.budget=16",
            "model.mixer.query_block=16",
            "model.mixer.n_init=4",
            "model.mixer.n_recent=8",
            "model.mixer.max_chunk=8",
        ],
        ["model.mixer.impl"],
        "torch",
    ),
    "tokenformer-tiny": (
        ["model.max_seq_len=32", "model.proj.qkv_tokens=40", "model.proj.proj_tokens=24", "model.ffn.n_tokens=72"],
        ["model.proj.impl", "model.ffn.impl"],
        "naive",
    ),
    "duo-tiny": (["model.max_seq_len=32", "model.ffn.d_ff=64", "model.ffn.small_ratio=8"], ["model.ffn.impl"], "torch"),
}


def train_step(name: str, impl: str):
    size, keys, _ = MODELS[name]
    cfg = load_config(CONFIGS / f"lm/{name}.yaml", SHRINK + size + [f"{k}={impl}" for k in keys])
    torch.manual_seed(0)
    model = build_model(cfg["model"]).to(DEVICE)
    T = cfg["model"]["max_seq_len"]
    x = torch.randint(0, 256, (2, T + 1), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, dict(
        zip([n for n, p in model.named_parameters() if p.requires_grad], torch.autograd.grad(loss, params))
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_training_step_through_triton_kernels_matches_pytorch(name):
    loss, grads = train_step(name, "triton")
    ref_loss, ref_grads = train_step(name, MODELS[name][2])
    op = f"model step {name}"
    check(op, "triton", torch.float32, "loss", loss[None], ref_loss[None], floor=0)
    assert grads.keys() == ref_grads.keys()
    for key, g in grads.items():  # relative to each gradient's own scale (small in a tiny model)
        check(op, "triton", torch.float32, f"d {key}", g, ref_grads[key], floor=0)
    kernel_params = [k for k in grads if ".mixer." in k or ".ffn." in k]
    assert kernel_params and all(ref_grads[k].abs().max() > 0 for k in kernel_params)
