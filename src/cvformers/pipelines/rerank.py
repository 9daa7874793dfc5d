"""Reranking generated images with CLIP (DALL-E §2.3 / §3, figure 9).

DALL-E draws N candidates per caption and keeps the k whose CLIP image embedding is most
similar to the caption's text embedding. ``ClipReranker`` is that scorer; the text-to-image
pipeline only needs its ``score(images, texts) -> Tensor[N]``.

    reranker = ClipReranker.load("runs/clip")                   # or an OpenAI / open_clip .pt
    scores = reranker.score(candidates, "a red circle")         # [N] cosine similarities
    best = scores.topk(8).indices
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from cvformers.errors import UserError
from cvformers.images import fit_images


def pil_to_tensor(images: Sequence) -> torch.Tensor:
    """A list of PIL images (same size) -> [B, 3, H, W] in [0, 1]."""
    out = []
    for im in images:
        im = im.convert("RGB")
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
        out.append(x.permute(2, 0, 1).float() / 255.0)
    if len({tuple(x.shape) for x in out}) > 1:
        raise UserError("images to score must all have the same size")
    return torch.stack(out)


class ClipReranker:
    """Scores (image, caption) agreement with a CLIP; higher = better match."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size

    @classmethod
    def load(cls, source: str | Path, vocab: str | Path | None = None, quick_gelu: bool = True,
             device: str = "cpu") -> "ClipReranker":
        """From a CLIP run folder or an OpenAI / open_clip weight file (see ``load_clip``)."""
        from cvformers.loading import load_clip

        model, tokenizer = load_clip(source, vocab=vocab, quick_gelu=quick_gelu, device=device)
        return cls(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """[N, D] unit image embeddings of a [N, C, H, W] tensor in [0, 1] or a list of PIL images."""
        if not isinstance(images, torch.Tensor):
            images = pil_to_tensor(images)
        images = fit_images(images.float(), self.model.cfg.image_size)
        parts = [self.model.encode_image(chunk.to(self.device), normalize=True)
                 for chunk in images.split(self.batch_size)]
        return torch.cat(parts)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        parts = [self.model.encode_text(self.tokenizer.encode(list(texts[i:i + self.batch_size])).to(self.device),
                                        normalize=True)
                 for i in range(0, len(texts), self.batch_size)]
        return torch.cat(parts)

    def score(self, images, texts: str | Sequence[str]) -> torch.Tensor:
        """[N] cosine similarity of image i with its caption (CPU tensor).

        ``texts``: one caption for every image (a str or a 1-item list), or N captions, one
        per image.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        image_features = self.embed_images(images)
        n = len(image_features)
        if len(texts) not in (1, n):
            raise UserError(f"score: {n} images but {len(texts)} captions (give 1 or {n})")
        text_features = self.embed_texts(texts)
        return (image_features * text_features.expand(n, -1)).sum(-1).cpu()

    def score_matrix(self, images, texts: Sequence[str]) -> torch.Tensor:
        """[N images, T texts] cosine similarities."""
        return (self.embed_images(images) @ self.embed_texts(list(texts)).t()).cpu()

    def rerank(self, images, text: str, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and scores of the ``keep`` best images for ``text``, best first."""
        scores = self.score(images, text)
        top = scores.topk(min(keep, len(scores)))
        return top.indices, top.values


def clip_scores(images: torch.Tensor, texts: Sequence[str], model, tokenizer) -> torch.Tensor:
    """Cosine similarity of each image with its caption, as a metric ("CLIP score" / 100)."""
    return ClipReranker(model, tokenizer).score(images, texts)


__all__ = ["ClipReranker", "clip_scores", "pil_to_tensor"]
