"""VQ-VAE image tokenizer (van den Oord et al. 2017, "Neural Discrete Representation Learning").

The same face as the dVAE (encode -> ids [B,h,w], decode -> images), so DALL-E can hold
either. The encoder and decoder are the dVAE's residual stacks (dvae.py); between them each
encoder vector is replaced by its nearest codebook vector:

- nearest-codebook quantization, with the straight-through estimator: the decoder's gradient
  is copied onto the encoder output (paper §3.2);
- the commitment loss β·||z_e − sg(e)||² keeps the encoder near its codes (paper eq. 3, β = 0.25);
- the codebook itself is not learnt by gradient but as an exponential moving average of the
  encoder vectors assigned to each code (paper appendix A.1, decay 0.99);
- codes that fall out of use are restarted on random encoder outputs of the current batch
  (Dhariwal et al. 2020, Jukebox §3.2 / appendix), which keeps the codebook alive on small data.
  The codebook is also first initialised from encoder outputs, not noise.

Beyond the paper, ``colour_vocab_size > 0`` factorises each id into (structure, colour), for
flat-colour images (shapes, clip art): a structure code from an encoder that sees only the
luminance divided by its maximum in each cell (so a red and a blue triangle give the same
input), and a colour code from a small per-cell colour encoder, each with its own codebook; the
decoder reads both. The id is ``structure · colour_vocab_size + colour``. A DALL-E over these ids
(``DalleConfig.image_inner_vocab``) predicts the two parts with two heads, so it can draw a
colour–shape pair that never occurred in training from the parts that did.

Buffers (codebook, EMA counts and sums) live in the state dict, so a checkpoint resumes exactly.
Under DDP the batch statistics are summed over processes and restarts are broadcast from rank 0,
so every replica keeps the same codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cvformers.config import ConfigError
from cvformers.vae.metrics import code_perplexity, psnr
from cvformers.registry import register_kind
from cvformers.vae.dvae import Decoder, Encoder


@dataclass
class VQVAEConfig:
    image_size: int = 32  # input side in pixels (square); divisible by 2^(group_count-1)
    channels: int = 3  # image channels
    vocab_size: int = 512  # codebook size K
    code_dim: int = 64  # dimension of each codebook vector
    n_hid: int = 64  # width of encoder group 1; group i is 2^(i-1)·n_hid wide (as the dVAE)
    n_blk_per_group: int = 1  # residual blocks per group
    group_count: int = 3  # groups; grid_size = image_size / 2^(group_count-1)
    n_init: int = 64  # decoder: channels of the 1×1 conv that reads the code vectors
    commitment_weight: float = 0.25  # β of the commitment loss (paper eq. 3)
    ema_decay: float = 0.99  # decay of the codebook moving averages (paper appendix A.1)
    ema_eps: float = 1e-5  # Laplace smoothing of the EMA code counts (avoids division by zero)
    dead_code_threshold: float = 1.0  # restart a code whose EMA count of assignments per batch drops below this (0: never)
    colour_vocab_size: int = 0  # 0: one codebook, one id per cell; K > 0: ids factorised into structure × K colours
    colour_dim: int = 8  # dimension of each colour codebook vector (factorised ids only)
    luminance_floor: float = 0.1  # the structure input divides luminance by max(cell maximum, this)

    def __post_init__(self) -> None:
        for name in ("image_size", "channels", "vocab_size", "code_dim", "n_hid", "n_blk_per_group", "group_count", "n_init"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_hid % 4:
            raise ConfigError(f"model.n_hid must be a multiple of 4, got {self.n_hid}")
        if self.image_size % 2 ** (self.group_count - 1):
            raise ConfigError(f"model.image_size {self.image_size} is not divisible by 2^(group_count-1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"model.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.colour_vocab_size < 0 or self.colour_dim < 1 or self.luminance_floor <= 0:
            raise ConfigError("model.colour_vocab_size must be >= 0, colour_dim >= 1 and luminance_floor > 0")

    @property
    def cell(self) -> int:
        """Pixels per id along each side."""
        return 2 ** (self.group_count - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.cell


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class EMAQuantizer(nn.Module):
    """Nearest-neighbour codebook with EMA updates and dead-code restarts."""

    def __init__(self, vocab_size: int, code_dim: int, decay: float, eps: float, dead_threshold: float):
        super().__init__()
        self.vocab_size, self.decay, self.eps, self.dead_threshold = vocab_size, decay, eps, dead_threshold
        self.register_buffer("codebook", torch.randn(vocab_size, code_dim))
        self.register_buffer("ema_count", torch.ones(vocab_size))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("initialized", torch.tensor(False))
        self.last_restarts = 0

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """[N, D] -> ids [N] of the nearest codebook vector (squared Euclidean)."""
        dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t() + self.codebook.pow(2).sum(1)
        return dist2.argmin(1)

    def _sample_rows(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        idx = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        rows = flat[idx].clone()
        if _distributed():
            dist.broadcast(rows, src=0)
        return rows

    @torch.no_grad()
    def initialize(self, flat: torch.Tensor) -> None:
        """Start the codebook on encoder outputs: each code at a random encoder vector of the batch."""
        share = flat.shape[0] / self.vocab_size  # assignments per code per batch if usage were uniform
        self.codebook.copy_(self._sample_rows(flat, self.vocab_size))
        self.ema_count.fill_(share)
        self.ema_sum.copy_(self.codebook * share)
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        """One EMA step of counts and sums (appendix A.1), then restart the codes that died."""
        one_hot = F.one_hot(ids, self.vocab_size).type_as(flat)
        counts, sums = one_hot.sum(0), one_hot.t() @ flat
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.vocab_size * self.eps) * n
        self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))
        self.last_restarts = 0
        if self.dead_threshold > 0:
            dead = self.ema_count < self.dead_threshold
            n_dead = int(dead.sum())
            if n_dead:
                fresh = self._sample_rows(flat, n_dead)
                self.codebook[dead] = fresh
                self.ema_sum[dead] = fresh * self.dead_threshold
                self.ema_count[dead] = self.dead_threshold
                self.last_restarts = n_dead

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_e [B,D,h,w] -> (z_q with straight-through gradient, ids [B,h,w], commitment loss)."""
        b, _, h, w = z_e.shape
        flat = rearrange(z_e, "b d h w -> (b h w) d").float()
        if self.training and not bool(self.initialized):
            self.initialize(flat.detach())
        ids = self.nearest(flat.detach())
        quantized = self.codebook[ids]  # a copy: the update below does not change it
        if self.training:
            self.update(flat.detach(), ids)
        commitment = F.mse_loss(flat, quantized)  # ||z_e - sg(e)||²; the codebook has no gradient
        quantized = flat + (quantized - flat).detach()  # straight-through (§3.2)
        z_q = rearrange(quantized, "(b h w) d -> b d h w", b=b, h=h, w=w).to(z_e.dtype)
        return z_q, rearrange(ids, "(b h w) -> b h w", b=b, h=h, w=w), commitment


_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights


def cell_normalised_luminance(images: torch.Tensor, cell: int, floor: float) -> torch.Tensor:
    """Images [B,C,H,W] in [0,1] -> luminance / max(its maximum in each cell×cell block, floor), [B,1,H,W].

    On a flat-coloured object this is 1 whatever the colour, so the structure encoder that reads
    it cannot tell colours apart: colour has to travel through the colour code.
    """
    if images.shape[1] == 3:
        luma = torch.einsum("bchw,c->bhw", images, images.new_tensor(_LUMA))[:, None]
    else:
        luma = images.mean(1, keepdim=True)
    peak = F.max_pool2d(luma, cell).clamp_min(floor)
    return luma / F.interpolate(peak, scale_factor=cell, mode="nearest")


class CellColourEncoder(nn.Module):
    """Pixels [B,C,H,W] in [-1,1] -> one colour vector per cell [B,colour_dim,h,w].

    A 3×3 and a 1×1 convolution, then a max over the cell: the brightest features win, so a
    cell half covered by an object reports the object's colour, not a mix with the background.
    """

    def __init__(self, channels: int, width: int, colour_dim: int, cell: int):
        super().__init__()
        self.cell = cell
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 1)
        self.out = nn.Conv2d(width, colour_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.out(F.max_pool2d(x, self.cell))


@register_kind("vqvae", VQVAEConfig)
class VQVAE(nn.Module):
    """VQ-VAE with the image-tokenizer face: encode(images)->ids[B,h,w], decode(ids)->images."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        K_c = cfg.colour_vocab_size
        quantizer_args = (cfg.ema_decay, cfg.ema_eps, cfg.dead_code_threshold)
        # factorised ids: the structure encoder reads one channel (cell-normalised luminance)
        self.encoder = Encoder(cfg, n_out=cfg.code_dim, n_in=1 if K_c else cfg.channels)
        self.quantizer = EMAQuantizer(cfg.vocab_size, cfg.code_dim, *quantizer_args)
        if K_c:
            self.colour_encoder = CellColourEncoder(cfg.channels, cfg.n_hid, cfg.colour_dim, cfg.cell)
            self.colour_quantizer = EMAQuantizer(K_c, cfg.colour_dim, *quantizer_args)
        self.decoder = Decoder(cfg, n_in=cfg.code_dim + (cfg.colour_dim if K_c else 0), n_out=cfg.channels)
        self.num_tokens = cfg.vocab_size * max(K_c, 1)
        # (structure codes, colour codes) when ids are pairs, read by the DALL-E task
        self.code_factors = (cfg.vocab_size, K_c) if K_c else None
        self.grid_size = cfg.grid_size
        self.image_size = cfg.image_size
        self.channels = cfg.channels

    # images live in [0,1]; the networks see and emit [-1, 1]
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Encoder outputs, one [B,D,h,w] per codebook (structure first)."""
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"expected images [B,{self.channels},H,W], got {tuple(images.shape)}")
        if self.code_factors is None:
            return [self.encoder(images * 2 - 1)]
        structure = cell_normalised_luminance(images, self.cfg.cell, self.cfg.luminance_floor)
        return [self.encoder(structure * 2 - 1), self.colour_encoder(images * 2 - 1)]

    def quantizers(self) -> list[EMAQuantizer]:
        return [self.quantizer] + ([self.colour_quantizer] if self.code_factors else [])

    def to_images(self, out: torch.Tensor) -> torch.Tensor:
        return ((out + 1) / 2).clamp(0, 1)

    def join_ids(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """One id tensor per codebook -> the ids DALL-E sees (structure · K + colour when factorised)."""
        return parts[0] if len(parts) == 1 else parts[0] * self.cfg.colour_vocab_size + parts[1]

    def split_ids(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of ``join_ids``."""
        K = self.cfg.colour_vocab_size
        return [ids] if self.code_factors is None else [ids // K, ids % K]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        parts = []
        for z_e, quantizer in zip(self.features(images), self.quantizers()):
            flat = rearrange(z_e, "b d h w -> (b h w) d").float()
            parts.append(rearrange(quantizer.nearest(flat), "(b h w) -> b h w", b=z_e.shape[0], h=z_e.shape[2]))
        return self.join_ids(parts)

    def code_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids [B,h,w] -> the codebook vectors the decoder reads [B,D,h,w] (structure then colour)."""
        if ids.dim() != 3:
            raise ValueError(f"expected ids [B,h,w], got {tuple(ids.shape)}")
        parts = self.split_ids(ids.long())
        vectors = [quantizer.codebook[part] for part, quantizer in zip(parts, self.quantizers())]
        return rearrange(torch.cat(vectors, dim=-1), "b h w d -> b d h w")

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.to_images(self.decoder(self.code_vectors(ids)))

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["image"] if isinstance(batch, dict) else batch
        quantized = [q(z_e) for z_e, q in zip(self.features(images), self.quantizers())]
        out = self.decoder(torch.cat([z_q for z_q, _, _ in quantized], dim=1))
        recon = F.mse_loss(out.float(), images.float() * 2 - 1)
        commitment = sum(c for _, _, c in quantized)
        loss = recon + self.cfg.commitment_weight * commitment
        with torch.no_grad():
            metrics = {
                "recon_mse": recon.item(),
                "commitment": commitment.item(),
                "psnr": psnr(self.to_images(out.float()), images.float()).item(),
                "perplexity": code_perplexity(self.join_ids([ids for _, ids, _ in quantized]), self.num_tokens),
                "restarts": float(sum(q.last_restarts for q in self.quantizers())),
            }
            if self.code_factors:
                metrics["colour_perplexity"] = code_perplexity(quantized[1][1], self.cfg.colour_vocab_size)
        return loss, metrics
