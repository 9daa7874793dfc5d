"""DALL-E's transformer (Ramesh et al. 2021, §2.2 and appendix B): one decoder over [text | image].

The caption becomes ``text_len`` BPE ids, padded with a *different* pad id at every position
(§2.2: "we use a special padding token for each of the 256 text positions"), so padding is an
ordinary token and needs no key mask. The image becomes the ``grid×grid`` ids of the frozen dVAE
in raster order. The two are concatenated and modelled by next-token prediction with sparse
attention (``cvformers.nn.attention``), the text loss weighted 1/8 and the image loss 7/8.

Beyond the paper: classifier-free guidance training (the caption is replaced by the all-pad
sequence with probability ``caption_drop_prob``), so sampling can mix conditional and
unconditional logits (``cvformers.pipelines.text_to_image``). With a factorised image tokenizer
(``VQVAEConfig.colour_vocab_size``), ``image_inner_vocab`` makes every image id a pair (outer,
inner): its embedding is the sum of the two parts' embeddings and its logit the sum of two heads'
logits, so p(id) = p(outer)·p(inner) given the context, and a pair never seen in training is
scored from parts that were (the paper has one joint vocabulary; this is a departure for
compositional generalisation on small data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cvformers.nn.attention import PATTERNS, build_pattern, paper_schedule
from cvformers.nn.transformer import SparseTransformerBlock, KVCache
from cvformers.registry import register_kind


@dataclass
class DalleConfig:
    num_text_tokens: int = 1056  # text vocab incl. the text_len per-position pad ids (BPE vocab + text_len)
    text_len: int = 32  # caption length in BPE tokens (paper: 256)
    num_image_tokens: int = 512  # image vocab = dVAE codebook size (paper: 8192)
    grid_size: int = 8  # image ids per side (paper: 32)
    dim: int = 256  # model width (paper: 62 heads x 64 = 3968)
    depth: int = 4  # number of blocks (paper: 64)
    heads: int = 8  # attention heads (paper: 62)
    dim_head: int = 32  # width of one head (paper: 64)
    mlp_ratio: float = 4.0  # MLP hidden width / dim
    dropout: float = 0.0  # residual and attention dropout
    attention: str | list[str] = "paper"  # "paper" (appendix B.1 schedule), "full", or one pattern name per layer
    conv_kernel: int = 11  # side of the conv pattern's neighbourhood (odd)
    caption_drop_prob: float = 0.1  # classifier-free guidance: P(caption -> all pads) in training (0 = paper)
    checkpoint_activations: bool = False  # recompute each block in backward to save memory
    text_loss_weight: float = 0.125  # §2.2: text cross-entropy weighted 1/8
    image_loss_weight: float = 0.875  # §2.2: image cross-entropy weighted 7/8
    image_inner_vocab: int = 0  # 0: one joint image vocabulary (paper); K: ids are pairs (id // K, id % K), two heads

    def __post_init__(self):
        if self.num_text_tokens <= self.text_len:
            raise ValueError("num_text_tokens must count the BPE vocab plus the text_len pad ids")
        if isinstance(self.attention, str) and self.attention not in ("paper", *PATTERNS):
            raise ValueError(f"attention must be 'paper', one of {PATTERNS}, or a list of those; got {self.attention!r}")
        if isinstance(self.attention, list) and len(self.attention) != self.depth:
            raise ValueError(f"attention lists {len(self.attention)} patterns for depth {self.depth}")
        if self.image_inner_vocab < 0 or (self.image_inner_vocab and self.num_image_tokens % self.image_inner_vocab):
            raise ValueError(f"image_inner_vocab {self.image_inner_vocab} must be 0 or divide num_image_tokens "
                             f"{self.num_image_tokens}")

    @property
    def seq_len(self) -> int:
        return self.text_len + self.grid_size**2

    def schedule(self) -> list[str]:
        if self.attention == "paper":
            return paper_schedule(self.depth)
        if isinstance(self.attention, str):
            return [self.attention] * self.depth
        return list(self.attention)


# Named sizes. "paper" is the 12B model of §2.2 / appendix B (build it on the meta device to count).
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, depth=2, heads=4, dim_head=16, text_len=16, num_text_tokens=272, grid_size=8,
                 num_image_tokens=64),
    "small": dict(dim=256, depth=4, heads=8, dim_head=32),
    "paper": dict(num_text_tokens=16384 + 256, text_len=256, num_image_tokens=8192, grid_size=32,
                  dim=62 * 64, depth=64, heads=62, dim_head=64),
}


class PairEmbedding(nn.Module):
    """Embedding of ids that are pairs, id = outer·K + inner: the sum of one embedding per part."""

    def __init__(self, num_outer: int, num_inner: int, dim: int):
        super().__init__()
        self.num_inner = num_inner
        self.outer = nn.Embedding(num_outer, dim)
        self.inner = nn.Embedding(num_inner, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.outer(ids // self.num_inner) + self.inner(ids % self.num_inner)


class PairHead(nn.Module):
    """Logits over pair ids as the sum of two heads: softmax of the sum = product of two softmaxes.

    Returns the joint logits [..., outer·K] (id = outer·K + inner), so sampling, top-k and
    guidance work unchanged on it; the cross-entropy of a pair is the sum of the parts'.
    """

    def __init__(self, dim: int, num_outer: int, num_inner: int):
        super().__init__()
        self.outer = nn.Linear(dim, num_outer, bias=False)
        self.inner = nn.Linear(dim, num_inner, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (self.outer(h)[..., :, None] + self.inner(h)[..., None, :]).flatten(-2)


@register_kind("dalle", DalleConfig)
class DALLE(nn.Module):
    def __init__(self, cfg: DalleConfig):
        super().__init__()
        self.cfg = cfg
        T, G, dim = cfg.text_len, cfg.grid_size, cfg.dim
        # separate input embeddings for the two vocabularies, and positions per modality (§2.2)
        self.text_emb = nn.Embedding(cfg.num_text_tokens, dim)
        K = cfg.image_inner_vocab
        self.image_emb = PairEmbedding(cfg.num_image_tokens // K, K, dim) if K else nn.Embedding(cfg.num_image_tokens, dim)
        self.text_pos = nn.Embedding(T, dim)
        self.image_row = nn.Embedding(G, dim)
        self.image_col = nn.Embedding(G, dim)
        self.drop = nn.Dropout(cfg.dropout)
        # one pattern object per name, shared by the layers that use it (its index caches too)
        patterns = {n: build_pattern(n, T, G, G, cfg.conv_kernel) for n in set(cfg.schedule())}
        self.blocks = nn.ModuleList(
            SparseTransformerBlock(dim, cfg.heads, cfg.dim_head, patterns[n], cfg.mlp_ratio, cfg.dropout) for n in cfg.schedule()
        )
        self.norm = nn.LayerNorm(dim)
        # separate heads: a text position predicts only text ids, an image position only image ids
        self.text_head = nn.Linear(dim, cfg.num_text_tokens, bias=False)
        self.image_head = (PairHead(dim, cfg.num_image_tokens // K, K) if K
                           else nn.Linear(dim, cfg.num_image_tokens, bias=False))

        ids = torch.arange(G * G)
        self.register_buffer("image_rows", ids // G, persistent=False)
        self.register_buffer("image_cols", ids % G, persistent=False)
        # per-position pad ids: position i pads with (BPE vocab + i)
        self.register_buffer("pad_ids", torch.arange(T) + cfg.num_text_tokens - T, persistent=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: scale residual projections by 1/sqrt(2·depth)
            for proj in (block.attn.proj, block.mlp.fc2):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.depth))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # --- embeddings -------------------------------------------------------------------------
    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """[B, L<=T] text ids at positions 0..L-1 -> [B, L, dim]."""
        return self.text_emb(text) + self.text_pos.weight[: text.shape[1]]

    def embed_image(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """[B, n] image ids at raster positions start..start+n-1 -> [B, n, dim]."""
        idx = slice(start, start + codes.shape[1])
        pos = self.image_row(self.image_rows[idx]) + self.image_col(self.image_cols[idx])
        return self.image_emb(codes) + pos

    def embed_image_id(self, code: torch.Tensor, index: int) -> torch.Tensor:
        """``embed_image`` of one id per sequence, code [B] at raster position ``index`` -> [B, dim]
        (the decode step's input: rows of plain tensors, half the small ops of the general form)."""
        row, col = divmod(index, self.cfg.grid_size)
        return self.image_emb(code) + (self.image_row.weight[row] + self.image_col.weight[col])

    def embed(self, text: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """[text | image ids] -> the blocks' input [B, T + n, dim] (embedding dropout included)."""
        x = self.embed_text(text)
        if codes is not None:
            x = torch.cat([x, self.embed_image(codes.flatten(1))], dim=1)
        return self.drop(x)

    def caption_dropped(self, text: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance training: each caption becomes all pads with probability p."""
        drop = torch.rand(text.shape[0], device=text.device) < self.cfg.caption_drop_prob
        return torch.where(drop[:, None], self.pad_ids.expand_as(text), text)

    def unconditional_text(self, batch: int) -> torch.Tensor:
        return self.pad_ids.expand(batch, -1).clone()

    # --- the transformer ------------------------------------------------------------------
    def forward(self, text: torch.Tensor, codes: torch.Tensor | None = None,
                caches: list[KVCache] | None = None) -> torch.Tensor:
        """text [B, T], codes [B, n] (n <= grid², raster order; or [B, h, w]) -> hidden [B, T+n, dim].

        With ``caches`` the keys/values of this prefix are stored for decoding (prefill).
        """
        x = self.embed(text, codes)
        for i, block in enumerate(self.blocks):
            if caches is not None:
                x = block(x, caches[i], 0)
            elif self.cfg.checkpoint_activations and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    @torch.no_grad()
    def attention_maps(self, text: torch.Tensor, codes: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer attention weights [B, heads, S, S] over [text | image ids] (S = text_len +
        grid²), each layer under its own pattern; rows sum to 1. For pictures (eval mode)."""
        x, maps = self.embed(text, codes), []
        for block in self.blocks:
            maps.append(block.attn.attention_weights(block.norm1(x)))
            x = block(x)
        return maps

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, T = self.cfg, self.cfg.text_len
        text, codes = batch["text"], batch["codes"].flatten(1)
        if self.training and cfg.caption_drop_prob > 0:
            text = self.caption_dropped(text)
        h = self(text, codes)
        # next-token prediction: output t predicts token t+1; the last text output predicts image id 0
        text_logits = self.text_head(h[:, : T - 1])
        image_logits = self.image_head(h[:, T - 1 : -1])
        text_loss = F.cross_entropy(text_logits.flatten(0, 1), text[:, 1:].flatten())
        image_loss = F.cross_entropy(image_logits.flatten(0, 1), codes.flatten())
        loss = cfg.text_loss_weight * text_loss + cfg.image_loss_weight * image_loss
        metrics = {
            "loss": loss.item(),
            "text_loss": text_loss.item(),
            "image_loss": image_loss.item(),
            "image_bits_per_token": image_loss.item() / math.log(2),
        }
        return loss, metrics

    # --- sampling with a KV cache -------------------------------------------------------------
    def new_caches(self, batch: int, packed: bool = True, device=None, dtype=None) -> list[KVCache]:
        """Preallocated key/value buffers for the whole sequence, one per layer.

        ``packed``: each cache also holds its layer's weights reordered for ``batch``-row products
        (oneDNN, fp32 CPU; ``cvformers.nn.decode_linear``), a copy made once per sampling run.
        """
        p = next(self.parameters())
        return [block.new_cache(batch, self.cfg.seq_len, packed, device=device or p.device, dtype=dtype or p.dtype)
                for block in self.blocks]

    @torch.no_grad()
    def prefill(self, text: torch.Tensor, caches: list[KVCache], codes: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prefix [text | first image ids] once, fill the caches -> logits of the next image id.

        The last layer's outputs are needed only at the last position (its keys and values at every
        position): it stores the keys and values of the others and runs one decode step for the
        last, which skips about 80% of that layer's work.
        """
        x = self.embed(text, codes)
        for block, cache in zip(self.blocks[:-1], caches):
            x = block(x, cache, 0)
        last, length = self.blocks[-1], x.shape[1]
        if length > 1:
            last.attn.store(last.norm1(x[:, :-1]), caches[-1])
        x = last.decode(x[:, -1], caches[-1], length - 1)
        return self.image_head(self.norm(x))

    @torch.no_grad()
    def decode_step(self, code: torch.Tensor, pos: int, caches: list[KVCache]) -> torch.Tensor:
        """Feed image id ``code`` [B] at sequence position ``pos`` -> logits [B, image vocab] of the next id."""
        x = self.embed_image_id(code, pos - self.cfg.text_len)  # [B, dim]: the blocks' decode path
        for block, cache in zip(self.blocks, caches):
            x = block.decode(x, cache, pos)
        return self.image_head(self.norm(x))


def image_inner_vocab_of(vae) -> int:
    """The ``image_inner_vocab`` a DALL-E over this image tokenizer's ids needs (0: plain ids)."""
    factors = getattr(vae, "code_factors", None)  # (outer, inner) when the ids are pairs
    return factors[1] if factors else 0




def meta_model(cfg: DalleConfig) -> DALLE:
    """Build on the meta device: no memory, for counting parameters of any size (e.g. PRESETS['paper'])."""
    with torch.device("meta"):
        return DALLE(cfg)
