"""Caption BPE tokenizer: per-position padding, round trip, truncation warning, bad input, CLI."""

import warnings

import pytest
import torch

from cvformers.cli import main
from cvformers.data.shapes import ShapesDataset
from cvformers.errors import UserError
from cvformers.text import BPETokenizer, CaptionTruncatedWarning


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(ShapesDataset("train", size=2000).captions(), vocab_size=400, text_len=24)


def test_per_position_padding(tok):
    ids = tok.encode(["a red circle", "a small blue square above a large green triangle"])
    assert ids.shape == (2, 24) and ids.dtype == torch.long
    assert tok.num_text_tokens == tok.vocab_size + 24
    n = len(tok.tokenize("a red circle"))
    # DALL-E §2.2: the pad at position i has its own id vocab_size + i
    assert ids[0, n:].tolist() == [tok.vocab_size + i for i in range(n, 24)]
    assert (ids[0, :n] < tok.vocab_size).all() and int(ids.max()) < tok.num_text_tokens
    assert tok.pad_sequence(3).tolist() == [[tok.pad_id(i) for i in range(24)]] * 3
    assert tok.decode(tok.pad_sequence(1)) == [""]


def test_round_trip_and_normalisation(tok):
    caps = ["a small blue square above a large green triangle", "a tiny violet disc in the upper left"]
    assert tok.decode(tok.encode(caps)) == caps
    assert tok.decode(tok.encode("  A Small\tBLUE   square ")[0]) == "a small blue square"
    # unseen words still encode (byte-level: no unknown token)
    assert tok.decode(tok.encode("a zebra ☂")[0]) == "a zebra ☂"


def test_truncation_warns(tok):
    long = " ".join(["a big red circle above a small blue square"] * 6)
    with pytest.warns(CaptionTruncatedWarning, match="truncated"):
        ids = tok.encode(long)
    assert (ids < tok.vocab_size).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode("a red circle")  # no warning when it fits


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_text_refused(tok, bad):
    with pytest.raises(UserError, match="empty"):
        tok.encode(["a red circle", bad])


def test_save_load(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    back = BPETokenizer.load(path)
    assert back.text_len == 24 and back.vocab_size == tok.vocab_size
    cap = "a large orange plus to the right of a white box"
    assert torch.equal(back.encode(cap), tok.encode(cap))
    assert BPETokenizer.load(tmp_path).text_len == 24  # a folder holding tokenizer.json
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(UserError):
        BPETokenizer.load(tmp_path / "bad.json")


def test_cli_train(tmp_path, capsys):
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--data", "shapes", "--samples", "500", "--vocab-size", "300",
                 "--text-len", "16", "--out", str(out)]) == 0
    assert BPETokenizer.load(out).text_len == 16
    assert main(["tokenizer", "encode", "   ", "--tokenizer", str(out)]) == 2
    assert "empty" in capsys.readouterr().err


def test_tokenizer_json_loads_in_hugging_face_tokenizers(tok, tmp_path):
    import glob
    import json

    from tokenizers import Tokenizer

    from cvformers.loading import default_bundle

    path = tok.save(tmp_path / "tokenizer.json")
    hf = Tokenizer.from_file(str(path))
    cap = "a large orange plus to the right of a white box"
    assert hf.encode(cap).ids == tok.tokenize(cap)
    assert len(hf.encode(cap + " and more" * 20).ids) == 24  # the caption length travels with the file
    shipped = glob.glob(str(default_bundle("default").parent / "**" / "tokenizer.json"), recursive=True)
    assert len(shipped) >= 2
    for file in shipped:
        Tokenizer.from_file(file)
    # a file of the earlier layout (length in a "cvformers" table) still loads
    legacy = json.loads(path.read_text())
    legacy.pop("truncation")
    legacy["cvformers"] = {"text_len": 24}
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    assert BPETokenizer.load(tmp_path / "legacy.json").text_len == 24
