"""Image–text retrieval with CLIP: Recall@K both ways (CLIP §3.1.6 / table 13 style).

Image -> text: for each image, rank every caption of the set by cosine similarity; a hit at K
when a matching caption is among the first K. Text -> image likewise. "Matching" is the
pair's own index, or — since procedural sets repeat captions ("a red circle") — any item
whose caption is the same string (``match_equal_captions=True``, the default), so that
identical captions are not counted as misses.
"""

from __future__ import annotations

from typing import Sequence

import torch

from cvformers.errors import UserError


def _hits(similarity: torch.Tensor, correct: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of rows whose best correct column ranks within the first k (ties optimistic)."""
    best_correct = similarity.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
    rank = (similarity > best_correct).sum(dim=1)  # columns strictly better than the best hit
    return {k: (rank < k).float().mean().item() for k in ks}


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                groups: Sequence | None = None) -> dict[str, float]:
    """{"i2t_R@k", "t2i_R@k"} for unit features [N, D] of N (image, caption) pairs.

    ``groups``: optional labels; items with equal labels count as matches of each other.
    """
    if len(image_features) != len(text_features) or len(image_features) == 0:
        raise UserError(f"retrieval needs N > 0 pairs, got {len(image_features)} images and {len(text_features)} texts")
    n = len(image_features)
    if groups is None:
        correct = torch.eye(n, dtype=torch.bool)
    else:
        ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        g = torch.tensor([ids[x] for x in groups])
        correct = g[:, None] == g[None, :]
    similarity = image_features.float().cpu() @ text_features.float().cpu().t()
    i2t, t2i = _hits(similarity, correct, ks), _hits(similarity.t(), correct.t(), ks)
    return {**{f"i2t_R@{k}": v for k, v in i2t.items()}, **{f"t2i_R@{k}": v for k, v in t2i.items()}}


@torch.no_grad()
def embed_pairs(model, tokenizer, dataset, limit: int = 1000, batch_size: int = 128):
    """(image features, text features, captions) of the first ``limit`` items of ``dataset``."""
    from cvformers.data import collate
    from cvformers.images import fit_images
    from cvformers.utils import progress

    n = min(limit, len(dataset)) if limit else len(dataset)
    if n == 0:
        raise UserError("the retrieval dataset is empty")
    device = next(model.parameters()).device
    images, texts, captions = [], [], []
    for start in progress(range(0, n, batch_size), desc="embedding pairs", unit="batch"):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, n))])
        pixels = fit_images(batch["image"], model.cfg.image_size).to(device)
        images.append(model.encode_image(pixels, normalize=True).cpu())
        texts.append(model.encode_text(tokenizer.encode(batch["caption"]).to(device), normalize=True).cpu())
        captions += batch["caption"]
    return torch.cat(images), torch.cat(texts), captions


def evaluate_retrieval(source, data: str | None = None, split: str = "test", limit: int = 1000,
                       ks: Sequence[int] = (1, 5, 10), match_equal_captions: bool = True,
                       vocab=None, quick_gelu: bool = True) -> dict[str, float | int]:
    """Recall@K of the CLIP at ``source`` on ``limit`` pairs of ``data`` (default: the run's own data)."""
    from pathlib import Path

    from cvformers.config import from_dict, load_toml
    from cvformers.data import DataConfig, build_from_config
    from cvformers.loading import load_clip

    model, tokenizer = load_clip(source, vocab=vocab, quick_gelu=quick_gelu)
    run_config = Path(source) / "config.toml"
    table = dict(load_toml(run_config).get("data", {})) if run_config.is_file() else {}
    if data is not None:
        table = {"name": data, "channels": table.get("channels", 3)}
    if "name" not in table:
        raise UserError("which data? give --data (the source is not a run folder that names its data)")
    table["image_size"] = model.cfg.image_size
    dataset = build_from_config(from_dict(DataConfig, table, "data"), split)
    image_features, text_features, captions = embed_pairs(model, tokenizer, dataset, limit)
    result = recall_at_k(image_features, text_features, ks, captions if match_equal_captions else None)
    return {"pairs": len(captions), **{k: round(v, 4) for k, v in result.items()}}
