"""The corpus of `make-reference` (runners/reference.py): documents from local text or the Python
standard library, the held-out split, the byte-level BPE tokenizer and the token stream."""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2: the presets' pad/bos/eos ids
EOS_ID = 2
BLOCK_BYTES = 8192  # a document when the corpus has few files
MIN_DOCUMENTS = 50


class ReferenceError(Exception):
    """A usage problem (bad files, an existing output folder): one line, exit code 2."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()


# ---------------------------------------------------------------- corpus and split


def stdlib_documents(max_bytes: int) -> tuple[list[Document], str]:
    """`.py` files of this Python's standard library (site-packages excluded), in hash order of
    their relative paths, read until `max_bytes` are collected."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    names = sorted((rel.as_posix() for rel in (p.relative_to(root) for p in root.rglob("*.py"))
                    if not skip & set(rel.parts)), key=lambda n: Document(n, "").digest)
    docs, total = [], 0
    for name in names:
        if total >= max_bytes:
            break
        text = _read_text(root / name)
        if text:
            docs.append(Document(name, text))
            total += len(text.encode())
    return docs, f"Python {platform.python_version()} standard library .py sources ({root})"


def file_documents(paths: list[str]) -> tuple[list[Document], str]:
    """The user's files (a directory stands for every file under it), as UTF-8 text."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise ReferenceError(f"--text {given}: no such file or directory")
    docs = [Document(str(p), text) for p in files if (text := _read_text(p))]
    if not docs:
        raise ReferenceError(f"--text {' '.join(paths)}: no UTF-8 text in these files")
    return docs, f"{len(docs)} user file(s): {', '.join(paths)}"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""  # binary or unreadable: not text


def cap_documents(docs: list[Document], max_bytes: int) -> list[Document]:
    """Hash order; documents up to `max_bytes` of UTF-8 in all (the last one cut at a line).
    Fewer than MIN_DOCUMENTS documents are cut into blocks, so held-out text is a real sample."""
    kept, total = [], 0
    for doc in sorted(docs, key=lambda d: d.digest):
        size = len(doc.text.encode())
        if total + size > max_bytes:
            room = doc.text.encode()[: max_bytes - total].decode(errors="ignore")
            if "\n" in room:
                kept.append(Document(doc.name, room[: room.rindex("\n") + 1]))
            break
        kept.append(doc)
        total += size
    if len(kept) < MIN_DOCUMENTS:
        kept = sorted((block for doc in kept for block in _blocks(doc)), key=lambda d: d.digest)
    return kept


def _blocks(doc: Document) -> list[Document]:
    blocks, current, size = [], [], 0
    for line in doc.text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= BLOCK_BYTES:
            blocks.append(Document(f"{doc.name}#{len(blocks)}", "".join(current)))
            current, size = [], 0
    if current:
        blocks.append(Document(f"{doc.name}#{len(blocks)}", "".join(current)))
    return blocks


def split_documents(docs: list[Document], heldout_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, held-out): the `heldout_fraction` of documents with the smallest name hashes held out."""
    if len(docs) < 2:
        raise ReferenceError("the corpus has fewer than 2 documents: nothing to hold out (give more text)")
    ranked = sorted(docs, key=lambda d: d.digest)
    count = min(len(docs) - 1, max(1, round(heldout_fraction * len(docs))))
    return ranked[count:], ranked[:count]


# ---------------------------------------------------------------- tokenizer and token ids


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> Any:
    """A byte-level BPE tokenizer of at most `vocab_size` entries, as transformers' fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer, length=len(texts))
    pad, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=pad, bos_token=bos, eos_token=eos,
                                   model_max_length=max_length)


def token_stream(tokenizer: Any, docs: list[Document]) -> Any:
    """All documents' ids, each followed by <eos>, as one int32 array."""
    import numpy as np

    encoded = tokenizer.backend_tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
    return np.concatenate([np.asarray([*e.ids, EOS_ID], dtype=np.int32) for e in encoded])


def unigram_entropy(ids: Any) -> float:
    """-sum p log p of the token frequencies, nats/token: the loss of the best context-free model."""
    import numpy as np

    counts = np.bincount(ids)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------- training
