"""``python -m train grow``: TokenFormer progressive scaling of a trained checkpoint, and the callback that
keeps pre-growth tokens frozen when ``optim.freeze_old_tokens`` is set."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from arch import ConfigError, grow, save_pretrained
from arch.growth import freeze_old_tokens_

from .checkpoint import load_trained


class FreezeOldTokens(L.Callback):
    """After every optimizer step, write the pre-growth rows of every Pattention back (undoing their gradient
    update and weight decay), so only the tokens added by the latest ``grow`` train."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.saved = freeze_old_tokens_(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            for p, rows in self.saved:
                p[: rows.shape[0]].copy_(rows)


def parse_slots(text: str | None) -> dict | None:
    """'qkv=512,proj=512,ffn=2048' -> {'qkv': 512, 'proj': 512, 'ffn': 2048}."""
    if not text:
        return None
    try:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise ConfigError(f"--slots {text!r}: expected role=count pairs, e.g. qkv=512,proj=512,ffn=2048") from None


def grow_command(target: str, scale: float | None, slots: str | None, out: str | None, seed: int = 0) -> Path:
    cfg, model = load_trained(target)
    slot_map = parse_slots(slots)
    grown = grow(model, scale=None if slot_map else scale, slots=slot_map, seed=seed).eval()
    x = torch.randint(
        0,
        cfg["model"]["vocab_size"],
        (2, min(64, cfg["model"]["max_seq_len"])),
        generator=torch.Generator().manual_seed(seed),
    )
    with torch.no_grad():
        diff = (grown(x) - model(x)).abs().max().item()
    tag = f"x{scale:g}" if slot_map is None else "slots-" + "-".join(f"{k}{v}" for k, v in slot_map.items())
    src = Path(target)
    out_dir = Path(out) if out else (src if src.is_dir() else src.parent.parent) / f"grown-{tag}"
    save_pretrained(grown, out_dir)
    n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (model, grown))
    print(
        f"grew {target}: {n0 / 1e6:.2f}M -> {n1 / 1e6:.2f}M parameters ({tag}); "
        f"max |logit change| on a random batch: {diff:.2e}"
    )
    print(
        f"wrote {out_dir} (model.safetensors + config.yaml); continue with:\n"
        f"  python -m train fit <config.yaml> --init-from {out_dir}"
    )
    return out_dir
