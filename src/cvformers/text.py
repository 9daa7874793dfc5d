"""Caption tokenizer: byte-level BPE (HF ``tokenizers``) encoded to a fixed length, DALL-E style.

DALL-E §2.2: captions are lowercased, BPE-encoded (vocabulary 16,384 in the paper; small
data wants far fewer) and cut or padded to 256 tokens. Padding is not one shared id: "we
use a special padding token for each of the 256 text positions", so position i is padded
with id ``vocab_size + i``. The transformer's text vocabulary is therefore
``num_text_tokens = vocab_size + text_len``; a real token id is always ``< vocab_size``.

``tokenizer.json`` is the standard HF file plus one extra top-level table,
``"cvformers": {"text_len": ...}``, so that ``BPETokenizer.load(path)`` restores the fixed
length in one call (the table is removed before the JSON is handed to ``tokenizers``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch

from cvformers.errors import UserError
from cvformers.utils import atomic_write_bytes


class CaptionTruncatedWarning(UserWarning):
    """A caption had more BPE tokens than the fixed text length; the tail was dropped."""


def _normalizer():
    from tokenizers import Regex, normalizers

    # NFKC folds look-alike characters; captions are case- and spacing-insensitive (DALL-E lowercases).
    return normalizers.Sequence([
        normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(),
    ])


class BPETokenizer:
    """Byte-level BPE with fixed-length, per-position-padded encoding."""

    def __init__(self, tokenizer, text_len: int):
        if text_len < 1:
            raise UserError(f"text_len must be >= 1, got {text_len}")
        self._tok = tokenizer
        self.text_len = int(text_len)

    # --- sizes -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of real BPE tokens (ids 0 .. vocab_size-1)."""
        return self._tok.get_vocab_size()

    @property
    def num_text_tokens(self) -> int:
        """Size of the transformer's text vocabulary: BPE tokens + one pad id per position."""
        return self.vocab_size + self.text_len

    def pad_id(self, position: int) -> int:
        return self.vocab_size + position

    def pad_sequence(self, batch_size: int = 1, text_len: int | None = None) -> torch.Tensor:
        """All-padding rows [B, text_len]: the "no caption" input (e.g. classifier-free guidance)."""
        n = text_len or self.text_len
        return torch.arange(self.vocab_size, self.vocab_size + n).repeat(batch_size, 1)

    # --- training and files ----------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024, text_len: int = 32, min_frequency: int = 2):
        """Learn a vocabulary of at most ``vocab_size`` tokens from ``texts`` (it may end smaller
        when the corpus has fewer distinct words than that)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.normalizer = _normalizer()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()  # all 256 bytes: any text encodes, no <unk>
        if vocab_size < len(alphabet):
            raise UserError(f"vocab_size must be at least {len(alphabet)} (the byte alphabet), got {vocab_size}")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      initial_alphabet=alphabet, show_progress=False)
        texts = [t for t in texts if t and t.strip()]
        if not texts:
            raise UserError("cannot train a tokenizer on no text")
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, text_len)

    def to_bytes(self) -> bytes:
        """A tokenizer.json that Hugging Face ``tokenizers.Tokenizer.from_file`` reads as it is: the
        caption length is stored as its truncation length (a user of the file alone gets captions
        cut where the model cuts them)."""
        data = json.loads(self._tok.to_str())
        data["truncation"] = {"direction": "Right", "max_length": self.text_len, "strategy": "LongestFirst",
                              "stride": 0}
        return json.dumps(data, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes):
        from tokenizers import Tokenizer

        try:
            obj = json.loads(data.decode("utf-8"))
            # files written before the length moved into "truncation" keep it in a table of their own
            legacy = obj.pop("cvformers", None)
            text_len = int(legacy["text_len"] if legacy else obj["truncation"]["max_length"])
            obj["truncation"] = None  # encode() cuts captions itself, with a warning
            tok = Tokenizer.from_str(json.dumps(obj))
        except Exception as e:  # bad JSON, no caption length, or tokenizers refusing it
            raise UserError(f"not a cvformers tokenizer.json ({type(e).__name__}: {e})") from None
        return cls(tok, text_len)

    def save(self, path: str | Path) -> Path:
        atomic_write_bytes(Path(path), self.to_bytes())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"no tokenizer file at {path}")
        return cls.from_bytes(path.read_bytes())

    # --- encoding --------------------------------------------------------------------------
    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` that are not whole tokens of the vocabulary: BPE learns a merge for
        every word it saw often enough, so these are words the training captions did not hold
        (or held too rarely to matter). They still encode, as pieces the model cannot read."""
        normal = self._tok.normalizer.normalize_str(text) if self._tok.normalizer else text
        pieces = self._tok.pre_tokenizer.pre_tokenize_str(normal) if self._tok.pre_tokenizer else []
        unknown = []
        for piece, (start, end) in pieces:
            word = normal[start:end].strip()
            if word and word.isalpha() and self._tok.token_to_id(piece) is None and word not in unknown:
                unknown.append(word)
        return unknown

    def words(self) -> list[str]:
        """The whole words of the vocabulary (tokens that begin a word), without the steps of BPE's
        merges that lead to a longer word ("abo" on the way to "above")."""
        found = {tok[1:] for tok in self._tok.get_vocab() if tok.startswith("Ġ") and tok[1:].isalpha() and len(tok) > 2}
        return sorted(w for w in found if not any(o != w and o.startswith(w) for o in found))

    def tokenize(self, text: str) -> list[int]:
        """BPE ids of one caption, without padding or truncation."""
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"caption is empty or only whitespace: {text!r}")
        return self._tok.encode(text).ids

    def encode(self, texts: str | Sequence[str], text_len: int | None = None) -> torch.Tensor:
        """Captions -> LongTensor[B, text_len]; short ones padded with per-position pad ids."""
        if isinstance(texts, str):
            texts = [texts]
        for text in texts:
            if not isinstance(text, str):
                raise UserError(f"a caption must be text, got {type(text).__name__}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: undecodable bytes from a terminal or a file name
                raise UserError(f"the caption {text[:40]!r} holds characters that are not valid Unicode "
                                "(undecodable bytes); give it as UTF-8 text") from None
        n = text_len or self.text_len
        if n > self.text_len:
            raise UserError(f"text_len {n} exceeds the tokenizer's {self.text_len} (pad ids would collide)")
        out = self.pad_sequence(len(texts), n)
        for row, text in enumerate(texts):
            ids = self.tokenize(text)
            if len(ids) > n:
                shown = text if len(text) <= 60 else text[:57] + "..."
                warnings.warn(f"caption truncated from {len(ids)} to {n} tokens: {shown!r}",
                              CaptionTruncatedWarning, stacklevel=2)
                ids = ids[:n]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids) -> str | list[str]:
        """Ids (one sequence or a batch) -> text; pad ids and anything >= vocab_size are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(row) for row in ids]
        real = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(real).strip()


def dataset_captions(dataset, limit: int | None = None) -> list[str]:
    """Captions of a dataset without decoding images when the dataset can (``captions()``)."""
    if hasattr(dataset, "captions"):
        return dataset.captions(limit)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return [dataset[i]["caption"] for i in range(n)]


def train_tokenizer(dataset, out: str | Path, vocab_size: int = 1024, text_len: int = 32,
                    samples: int | None = None) -> BPETokenizer:
    """Train on the captions of ``dataset`` (the first ``samples`` items) and save to ``out``."""
    tok = BPETokenizer.train(dataset_captions(dataset, samples), vocab_size=vocab_size, text_len=text_len)
    tok.save(out)
    return tok
