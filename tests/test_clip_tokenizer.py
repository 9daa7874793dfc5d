"""CLIP's BPE on a small hand-made merge file (the real one is checked against open_clip in
test_clip_compat.py)."""

import gzip

import pytest
import torch

from cvformers.clip_tokenizer import ClipTokenizer, bytes_to_unicode, clean_text
from cvformers.errors import UserError


@pytest.fixture
def tok(tmp_path):
    merges = ["h i</w>", "t h", "th e</w>", "c a", "ca t</w>"]
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return ClipTokenizer.load(path, context_length=8)


def test_byte_alphabet_is_reversible_and_visible():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert all(not c.isspace() for c in table.values())
    assert list(table.values())[:3] == ["!", '"', "#"]  # printable bytes first: the vocab order


def test_vocabulary_layout(tok):
    # 256 bytes + 256 bytes with </w> + 5 merges + SOT + EOT
    assert tok.vocab_size == 256 + 256 + 5 + 2
    assert (tok.sot_id, tok.eot_id) == (517, 518)
    assert tok.encoder["hi</w>"] == 512 and tok.encoder["cat</w>"] == 516


def test_merges_apply_in_rank_order(tok):
    assert tok.bpe("the") == ["the</w>"]
    assert tok.bpe("hat") == ["h", "a", "t</w>"]  # no merge for (h, a) or (a, t</w>)
    assert tok.encode_one("The CAT, hi!") == [
        tok.encoder["the</w>"], tok.encoder["cat</w>"], tok.encoder[",</w>"], tok.encoder["hi</w>"],
        tok.encoder["!</w>"]]


def test_encode_frames_pads_and_truncates(tok):
    ids = tok.encode(["hi", "the cat " * 10])
    assert ids.shape == (2, 8) and ids.dtype == torch.long
    assert ids[0].tolist() == [517, 512, 518, 0, 0, 0, 0, 0]
    assert ids[1, 0] == 517 and ids[1, -1] == 518  # cut to 8, EOT kept last
    assert ids[1].argmax().item() == 7  # argmax pooling finds it


def test_decode_and_cleaning(tok):
    assert tok.decode(tok.encode(["the cat, hi"])[0]) == "the cat , hi"
    assert clean_text("  A &amp;amp;  B\n") == "a & b"


def test_missing_vocabulary_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ClipTokenizer.load(tmp_path / "nope.txt.gz")
