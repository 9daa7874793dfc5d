"""Retrieval Recall@K and the CLIP reranker DALL-E's text-to-image pipeline calls."""

import pytest
import torch
import torch.nn.functional as F

from cvformers.errors import UserError
from cvformers.eval.retrieval import recall_at_k
from cvformers.models.clip import CLIP, clip_config
from cvformers.pipelines.rerank import ClipReranker
from cvformers.text import BPETokenizer

torch.set_num_threads(1)


def test_recall_at_k_by_hand():
    # image i's nearest texts: 0 -> [0, ...], 1 -> [2, 1, ...], 2 -> [0, 1, 2]
    img = torch.eye(3)
    txt = F.normalize(torch.tensor([[1.0, 0.0, 0.9], [0.0, 1.0, 0.5], [0.0, 1.1, 0.0]]), dim=-1)
    sim = img @ txt.t()
    assert sim.argmax(1).tolist() == [0, 2, 0]
    r = recall_at_k(img, txt, ks=(1, 2, 3))
    # i2t: image 0 hit at rank 1, image 1 at rank 2, image 2 at rank 3
    assert (r["i2t_R@1"], r["i2t_R@2"], r["i2t_R@3"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
    # sim = [[.743, 0, 0], [0, .894, 1], [.669, .447, 0]]; t2i ranks images per column:
    # text 0 -> image 0 first, text 1 -> image 1 first, text 2 -> image 1 (1.0) before image 2 (0)
    assert (r["t2i_R@1"], r["t2i_R@2"]) == pytest.approx((2 / 3, 1.0))
    # equal captions count as matches of each other
    grouped = recall_at_k(img, txt, ks=(1,), groups=["a", "b", "b"])
    assert grouped["i2t_R@1"] == pytest.approx(2 / 3)  # image 1 -> text 2 is now a hit


@pytest.fixture(scope="module")
def reranker():
    tok = BPETokenizer.train(["a red circle", "a blue square", "a green plus"] * 4, vocab_size=280, text_len=8)
    torch.manual_seed(0)
    model = CLIP(clip_config("tiny", context_length=8, vocab_size=tok.num_text_tokens,
                             real_vocab_size=tok.vocab_size, embed_dim=16, vision_width=32, text_width=32))
    return ClipReranker(model, tok, batch_size=3)


def test_reranker_score_agrees_with_matrix_and_pil(reranker):
    from cvformers.images import to_pil

    images = torch.rand(5, 3, 32, 32)
    texts = ["a red circle", "a blue square", "a green plus", "a red square", "a blue plus"]
    scores = reranker.score(images, texts)
    assert scores.shape == (5,)
    assert torch.allclose(scores, reranker.score_matrix(images, texts).diagonal(), atol=1e-6)
    one = reranker.score(images, "a red circle")
    assert torch.allclose(one, reranker.score_matrix(images, ["a red circle"])[:, 0], atol=1e-6)
    # PIL input: the same numbers up to the 8-bit rounding of the pixels
    quantised = (images * 255).round() / 255
    pil = [to_pil(x) for x in quantised]
    assert torch.allclose(reranker.score(pil, "a red circle"), reranker.score(quantised, "a red circle"), atol=1e-5)
    idx, vals = reranker.rerank(images, "a red circle", keep=2)
    assert idx.tolist() == one.topk(2).indices.tolist() and vals[0] >= vals[1]
    with pytest.raises(UserError):
        reranker.score(images, texts[:2])


def test_reranker_loads_an_openai_layout_weight_file(tmp_path):
    """A .pt / .safetensors state dict in OpenAI layout + CLIP's BPE merges -> a working scorer."""
    import gzip
    import warnings

    from safetensors.torch import save_file

    vocab = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(vocab, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\nr e\nre d</w>\nc i\n")
    torch.manual_seed(0)
    # heads are inferred as width // 64, as in every released CLIP
    model = CLIP(clip_config("tiny", vision_width=64, vision_heads=1, text_width=64, text_heads=1,
                             embed_dim=16, tokenizer="clip", vocab_size=256 * 2 + 3 + 2, context_length=8,
                             text_pool="argmax", quick_gelu=True)).eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        from cvformers.clip_tokenizer import ClipTokenizer

        text = ClipTokenizer.load(vocab, context_length=8).encode(["a red circle"])
        expected = (model.encode_image(images, normalize=True) @ model.encode_text(text, normalize=True).t())[:, 0]
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.pt")
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    with warnings.catch_warnings():  # a TorchScript archive, as OpenAI released their weights
        warnings.simplefilter("ignore")
        torch.jit.trace(model, (images[:1], text), check_trace=False).save(str(tmp_path / "jit.pt"))
    for name in ("w.pt", "w.safetensors", "jit.pt"):
        reranker = ClipReranker.load(tmp_path / name, vocab=vocab)
        assert reranker.model.cfg.context_length == 8 and reranker.model.cfg.quick_gelu
        assert torch.allclose(reranker.score(images, "a red circle"), expected, atol=1e-5)
    with pytest.raises(UserError, match="not found"):
        ClipReranker.load(tmp_path / "missing.pt", vocab=vocab)
