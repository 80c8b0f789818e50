"""``python -m train <command> ...``: fit, eval, sample, info, bench, grow, oracle, bench-bra, bench-dhsa,
needle, dhsa-boundaries.

    python -m train fit configs/gpt-tiny.yaml [dotted.key=value ...] [--resume CKPT | --init-from PATH]
    python -m train eval <checkpoint | run dir> [dotted.key=value ...]
    python -m train sample <checkpoint | run dir> [--prompt TEXT] [--tokens N]
    python -m train info configs/gpt-tiny.yaml [dotted.key=value ...]
    python -m train grow <checkpoint | run dir> --scale 2 [--out DIR]
    python -m train bench configs/gpt-tiny.yaml [--steps N]
    python -m train oracle <checkpoint | run dir> [--budget K | --all-budgets] [--with-skip] [--batches N]
    python -m train bench-dhsa [--lengths 4096 8192 16384 32768] [--budget 1024]
    python -m train bench-bra [--batch 64] [--lengths 4096 8192 16384]
        [--lm configs/gpt-tiny.yaml configs/bra-tiny.yaml]
    python -m train needle <checkpoint | run dir> [dotted.key=value ...] [--variants dense dhsa fixed] [--budget B]
        [--mixer key=value ...] [--lengths 256 512 1024 2048] [--depths 0 0.25 0.5 0.75 1] [--trials 10] [--out DIR]
    python -m train dhsa-boundaries <checkpoint | run dir | model dir> [--batches 32] [--steps 300] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys

from arch.registry import ConfigError

from .checkpoint import CheckpointError
from .module import NonFiniteLossError


def _add_target(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("target", help=what)
    p.add_argument("overrides", nargs="*", help="config overrides, dotted.key=value (OmegaConf dotlist)")


def _alpha(text: str) -> float | None:
    """--alpha: a number, or 'none' for no class weighting."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in [0, 1] or 'none'") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="pretrain a model from a config")
    _add_target(p, "config YAML")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (or run dir: its newest checkpoint)")
    p.add_argument(
        "--init-from",
        metavar="PATH",
        help="start from the weights of a checkpoint, run dir or exported/grown model dir with a fresh "
        "optimizer and schedule: into this config's model if they fit it exactly, else into "
        "PATH's own model (e.g. a grown TokenFormer)",
    )

    p = sub.add_parser("grow", help="TokenFormer growth: append parameter tokens to every Pattention")
    p.add_argument("target", help="checkpoint file, run directory, or exported model directory")
    p.add_argument("--scale", type=float, default=2.0, help="multiply every token count by this (>= 1)")
    p.add_argument("--slots", help="explicit new counts per role instead of --scale, e.g. qkv=512,proj=512,ffn=2048")
    p.add_argument("--out", help="output directory (default: <run dir>/grown-x<scale>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new value tokens")

    p = sub.add_parser("eval", help="validation loss and bits/byte of a checkpoint on the whole held-out split")
    _add_target(p, "checkpoint file, run directory, or exported model directory")

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    _add_target(p, "checkpoint file, run directory, or exported model directory")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("info", help="resolved config, per-layer block table, parameters, FLOPs per token")
    _add_target(p, "config YAML")

    p = sub.add_parser("bench", help="Lightning vs bare PyTorch loop: tokens/s, step time, MFU, peak memory")
    _add_target(p, "config YAML")
    p.add_argument("--steps", type=int, default=40, help="timed steps per loop")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")

    p = sub.add_parser("oracle", help="Duo-LLM routing oracles: per-token best routes, fixed and random baselines")
    _add_target(p, "checkpoint file, run directory, or exported model directory of a duo model")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", type=int, default=None, help="only routes with exactly K big layers")
    g.add_argument("--all-budgets", action="store_true", help="every route, reported per budget K = 0..L (default)")
    p.add_argument("--with-skip", action="store_true", help="route space big/skip instead of big/small")
    p.add_argument("--batches", type=int, default=8, help="held-out batches (data.batch_size x data.seq_len tokens)")
    p.add_argument("--out", default=None, help="output folder (default: <run dir>/oracle)")
    p.add_argument("--chunk", type=int, default=16, help="route prefixes per batched module call")

    p = sub.add_parser(
        "bench-bra", help="bi-level routing attention vs the gather reference (2-D) and dense SDPA (1-D)"
    )
    p.add_argument("--batch", type=int, default=64, help="2-D batch (BiFormer-S stage 3)")
    p.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192, 16384], help="1-D sequence lengths")
    p.add_argument("--reps", type=int, default=3, help="timed runs per cell")
    p.add_argument("--region", type=int, default=64, help="1-D region size")
    p.add_argument("--topk", type=int, default=4, help="1-D routed past regions per query")
    p.add_argument("--query-block", type=int, default=1, help="1-D queries per block of the sparse core (1: per query)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per cell (0: torch's default)")
    p.add_argument(
        "--lm",
        nargs="*",
        default=[],
        metavar="CONFIG",
        help="also time training steps of these LM configs, interleaved (first = budget reference)",
    )
    p.add_argument("--lm-steps", type=int, default=8)

    p = sub.add_parser(
        "bench-dhsa", help="DHSA prefill latency and peak memory vs dense (SDPA, eager) and fixed block-sparse"
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768], help="prompt lengths")
    p.add_argument("--budget", type=int, default=1024, help="DHSA / block-sparse keys per query block")
    p.add_argument("--reps", type=int, default=2, help="timed runs per cell")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=16, help="fixed block-sparse chunk size")
    p.add_argument("--query-block", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads per cell (0: torch's default)")
    p.add_argument("--eager-max-gib", type=float, default=6.0, help="skip dense eager when its T×T scores exceed this")

    p = sub.add_parser(
        "needle",
        help="long context: passkey retrieval grid and perplexity vs context length, "
        "dense vs sparse attention variants of the same weights",
    )
    _add_target(p, "checkpoint file, run directory, or exported model directory of an LM")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=["dense", "dhsa", "fixed"],
        default=["dense", "dhsa", "fixed"],
        help="dense: as saved; dhsa: model.mixer.type=dhsa at --budget; fixed: dhsa with fixed blocks",
    )
    p.add_argument(
        "--budget",
        type=int,
        default=None,
        help="sparse attention budget (model.mixer.budget; default: longest length // 4)",
    )
    p.add_argument(
        "--mixer",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option of both sparse variants, as model.mixer.KEY=VALUE (repeatable)",
    )
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="context lengths in tokens (default: 256 512 1024 2048 capped at model.max_seq_len)",
    )
    p.add_argument(
        "--depths",
        type=float,
        nargs="+",
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="relative needle depths, 0 = start of the haystack, 1 = right before the question",
    )
    p.add_argument("--trials", type=int, default=10, help="random passkeys per (length, depth) cell")
    p.add_argument(
        "--key",
        choices=["digits", "letters"],
        default="digits",
        help="passkey of 5 digits, or of 5 capital letters (models trained on text without digits)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of passkeys and haystacks (the same for every variant)")
    p.add_argument(
        "--ppl-tokens",
        type=int,
        default=65536,
        help="held-out tokens for perplexity, the same text at every length (at least one longest window)",
    )
    p.add_argument("--batch-tokens", type=int, default=32768, help="tokens per forward pass for perplexity")
    p.add_argument("--out", default=None, help="output folder (default: <run dir>/needle)")
    p = sub.add_parser(
        "dhsa-boundaries",
        help="DHSA: train the learned chunk-boundary predictors on a model's keys, labeled by its own attention",
    )
    _add_target(p, "checkpoint file, run directory, or exported model directory (dense or DHSA mixers)")
    p.add_argument("--batches", type=int, default=32, help="train-split batches (data.batch_size x data.seq_len)")
    p.add_argument("--val-batches", type=int, default=8, help="held-out batches for the evaluation")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (one stored batch per step, all layers)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the init, the batch order and the train windows")
    p.add_argument("--ratio", type=float, default=2.0, help="label 1 where the attention mass ratio across p >= this")
    p.add_argument("--gamma", type=float, default=2.0, help="focal loss gamma (0: cross-entropy)")
    p.add_argument("--alpha", type=_alpha, default=0.25, help="focal loss alpha of the positives, or 'none'")
    # default None: the DHSA mixer's own default (arch/dhsa.py), so the predictors fit `model.mixer.type=dhsa`
    p.add_argument("--window", type=int, help="keys on each side of a candidate boundary (mixer.window; default 4)")
    p.add_argument("--hidden", type=int, help="predictor MLP width (mixer.predictor_hidden; default 256)")
    p.add_argument("--threshold", type=float, help="evaluation: boundary where the logit exceeds this (default 1.1)")
    p.add_argument("--nms-radius", type=int, help="evaluation: non-maximum suppression radius (default 8)")
    p.add_argument("--max-chunk", type=int, help="evaluation: maximum chunk length (default 64)")
    p.add_argument("--out", default=None, help="output file (default: <run dir>/dhsa/boundaries.safetensors)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may also follow options: ... --steps 5 a.b=1
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = list(getattr(args, "overrides", [])) + extra
    try:
        if args.command == "fit":
            from .fit import fit

            fit(args.target, args.overrides, resume=args.resume, init_from=args.init_from)
        elif args.command == "grow":
            from .grow import grow_command

            grow_command(args.target, args.scale, args.slots, args.out, args.seed)
        elif args.command == "eval":
            from .evaluate import evaluate

            evaluate(args.target, args.overrides)
        elif args.command == "sample":
            from .generate import sample_command

            sample_command(
                args.target, args.overrides, args.prompt, args.tokens, args.temperature, args.top_k, args.seed
            )
        elif args.command == "info":
            from .info import info

            info(args.target, args.overrides)
        elif args.command == "bench":
            from .bench import bench

            bench(args.target, args.overrides, steps=args.steps, warmup=args.warmup)
        elif args.command == "oracle":
            from .oracle import oracle

            oracle(
                args.target,
                args.overrides,
                budget=args.budget,
                with_skip=args.with_skip,
                batches=args.batches,
                out_dir=args.out,
                chunk=args.chunk,
            )
        elif args.command == "bench-dhsa":
            from .bench_dhsa import bench_dhsa

            bench_dhsa(
                args.lengths,
                args.budget,
                args.reps,
                args.heads,
                args.kv_heads,
                args.head_dim,
                args.chunk,
                args.query_block,
                args.threads,
                args.eager_max_gib,
            )
        elif args.command == "bench-bra":
            from .bench_bra import bench_bra, lm_step_times

            if args.lengths or args.batch:  # --batch 0 --lengths: only the LM step times
                bench_bra(args.batch, args.lengths, args.reps, args.region, args.topk, args.query_block, args.threads)
            if args.lm:
                lm_step_times(args.lm, args.lm_steps)
        elif args.command == "needle":
            from .needle import needle_command

            needle_command(
                args.target,
                args.overrides,
                args.variants,
                args.budget,
                args.mixer,
                args.lengths,
                args.depths,
                args.trials,
                args.seed,
                args.ppl_tokens,
                args.batch_tokens,
                args.out,
                args.key,
            )
        elif args.command == "dhsa-boundaries":
            from .dhsa_boundaries import dhsa_boundaries

            mixer_opts = {k: getattr(args, k) for k in ("window", "hidden", "threshold", "nms_radius", "max_chunk")}
            dhsa_boundaries(
                args.target,
                args.overrides,
                batches=args.batches,
                val_batches=args.val_batches,
                steps=args.steps,
                lr=args.lr,
                seed=args.seed,
                ratio=args.ratio,
                gamma=args.gamma,
                alpha=args.alpha,
                out=args.out,
                **{k: v for k, v in mixer_opts.items() if v is not None},
            )
    except (ConfigError, CheckpointError, NonFiniteLossError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, NonFiniteLossError) else 2
    return 0
