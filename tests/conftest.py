import os

# Must be set before triton is imported anywhere: kernels run in the Triton interpreter on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never touch the network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


MICRO = {  # a model and batches small enough for a test: 2 layers, d 32, T 32, batch 4
    "model.d_model": 32,
    "model.n_layers": 2,
    "model.n_heads": 2,
    "model.max_seq_len": 32,
    "data.batch_size": 4,
    "data.val_batches": 2,
}


def micro_overrides(tmp_path: Path, cache_dir: Path, **extra) -> list[str]:
    """``MICRO`` as a run: 6 steps, validation and checkpoints every 3, outputs under tmp_path."""
    base = {
        **MICRO,
        "data.cache_dir": str(cache_dir),
        "trainer.max_steps": 6,
        "trainer.log_every": 1,
        "trainer.val_every": 3,
        "trainer.ckpt_every": 3,
        "trainer.out_dir": str(tmp_path / "runs"),
        "trainer.progress_bar": False,
        "trainer.sample_tokens": 0,
        "optim.warmup_steps": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One token cache for the whole session (tokenizing the corpus once)."""
    return tmp_path_factory.mktemp("cache")


def assert_causal(run, vocab: int = 256, T: int = 23, positions=(0, 7, 21), atol: float = 1e-5, seed: int = 1):
    """Causality of an LM: perturbing the tokens after t changes no logit at or before t (and does change
    later ones, so the check can fail). ``run``: LongTensor [B, T] -> logits [B, T, V]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (3, T), generator=g)
    base = run(x)
    for t in positions:
        y = x.clone()
        y[:, t + 1 :] = torch.randint(0, vocab, y[:, t + 1 :].shape, generator=g)
        out = run(y)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=atol)
        assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 1e-4
