"""CLIP's own byte-level BPE (CLIP §2.5, after GPT-2 / Sennrich et al. 2016).

OpenAI's CLIP and open_clip tokenise lower-cased text with 49 152 - 256 - 2 merges learnt on
their data: 256 byte symbols, the same 256 with an end-of-word marker ``</w>``, 48 894 merges,
and the two markers ``<start_of_text>`` (49406) and ``<end_of_text>`` (49407) — 49 408 ids.
A caption becomes ``[SOT] tokens [EOT]`` zero-padded to 77 ids; the text tower reads its
vector at the EOT, the largest id, hence ``argmax`` pooling.

The merge list (``bpe_simple_vocab_16e6.txt.gz``, 1.3 MB) is not shipped with cvformers: it
is read from an installed ``open_clip_torch`` (or OpenAI's ``clip``) package, from
``$CVFORMERS_CLIP_VOCAB``, or from a path the caller gives. Models trained here use the
project's own tokenizer (``cvformers.text.BPETokenizer``); see ``load_text_tokenizer``.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import torch

from cvformers.errors import UserError

try:  # \p{L} / \p{N} need the third-party `regex`; plain `re` below is exact for ASCII text
    import regex as _re

    _LETTERS, _NUMBER, _OTHER = r"\p{L}+", r"\p{N}", r"[^\s\p{L}\p{N}]+"
except ModuleNotFoundError:  # pragma: no cover - depends on the environment
    import re as _re

    _LETTERS, _NUMBER, _OTHER = r"[^\W\d_]+", r"\d", r"(?:[^\s\w]|_)+"

try:  # OpenAI repairs mojibake with ftfy before tokenising; optional here
    import ftfy
except ModuleNotFoundError:  # pragma: no cover
    ftfy = None

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<start_of_text>", "<end_of_text>"
NUM_MERGES = 49152 - 256 - 2  # how many merge lines CLIP uses from the file


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """A reversible map byte -> printable unicode character (GPT-2's).

    Printable Latin-1 bytes map to themselves; the others (controls, space, …) are moved to
    code points from 256 on, so that every BPE symbol is a visible, non-space character.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    # insertion order matters: it is the order of the first 256 ids of the vocabulary
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


def clean_text(text: str) -> str:
    """What CLIP does before splitting: fix encoding, unescape HTML, collapse spaces, lower."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


def find_vocab_file(path: str | os.PathLike | None = None) -> Path:
    """The merge file: ``path``, else $CVFORMERS_CLIP_VOCAB, else inside open_clip / clip."""
    candidates = []
    if path is not None:
        candidates.append(Path(path))
    elif os.environ.get("CVFORMERS_CLIP_VOCAB"):
        candidates.append(Path(os.environ["CVFORMERS_CLIP_VOCAB"]))
    else:
        for package in ("open_clip", "clip"):
            try:  # find_spec does not import, so torchvision need not be importable
                spec = importlib.util.find_spec(package)
            except (ImportError, ValueError):
                spec = None
            if spec is not None and spec.submodule_search_locations:
                candidates += [Path(p) / VOCAB_FILE for p in spec.submodule_search_locations]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = str(candidates[0]) if path is not None or candidates else "open_clip (not installed)"
    raise UserError(f"CLIP BPE vocabulary {VOCAB_FILE} not found at {where}; "
                    "`pip install open_clip_torch` or pass its path (or set CVFORMERS_CLIP_VOCAB)")


class ClipTokenizer:
    """CLIP's tokenizer: ``tok(["a photo of a cat."]) -> LongTensor[1, 77]``."""

    def __init__(self, merges: list[tuple[str, str]], context_length: int = 77):
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.context_length = context_length
        self.pattern = _re.compile(
            rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|{_LETTERS}|{_NUMBER}|{_OTHER}", _re.IGNORECASE)
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, context_length: int = 77) -> "ClipTokenizer":
        file = find_vocab_file(path)
        lines = gzip.open(file, "rt", encoding="utf-8").read().split("\n")
        # line 0 is a version header; CLIP keeps exactly NUM_MERGES merges after it
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1] if line.strip()]
        return cls(merges, context_length)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> list[str]:
        """Merge the symbols of one pre-token, lowest-ranked pair first, until none applies."""
        if word in self._cache:
            return self._cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]  # the last symbol carries the end-of-word mark
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode_one(self, text: str) -> list[int]:
        """One string -> BPE ids, without SOT/EOT."""
        ids = []
        for piece in self.pattern.findall(clean_text(text)):
            if piece in (SOT, EOT):  # markers written in the text are the markers
                ids.append(self.encoder[piece])
                continue
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[s] for s in self.bpe(symbols)]
        return ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eot_id in ids:  # what follows the EOT is padding
            ids = ids[:ids.index(self.eot_id)]
        ids = [i for i in ids if i != self.sot_id]
        text = "".join(self.decoder[i] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def encode(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """[SOT] ids [EOT], cut to ``context_length`` (the EOT kept last), zero-padded."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode_one(text), self.eot_id]
            if len(ids) > length:
                ids = ids[:length - 1] + [self.eot_id]
            out[row, :len(ids)] = torch.tensor(ids)
        return out

    __call__ = encode
