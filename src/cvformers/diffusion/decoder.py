"""unCLIP's decoder: a diffusion U-Net that draws an image from its CLIP image embedding (Ramesh et
al. 2022, arXiv 2204.06125, §2.1), and its upsampler (the same section's diffusion upsamplers).

**Decoder** (GLIDE-style, kind "unclip_decoder"). The CLIP image embedding conditions the U-Net
twice, as the paper says: "projecting and adding CLIP embeddings to the existing timestep
embedding, and by projecting CLIP embeddings into four extra tokens of context that are
concatenated to the sequence of outputs from the GLIDE text encoder". The caption goes through a
small transformer text encoder of the decoder's own (GLIDE §2.3; ``CaptionDDPM``'s, which this
model extends) whose outputs every attention layer of the U-Net reads. Classifier-free guidance: in training "randomly setting the CLIP
embeddings to zero (or a learned embedding) 10% of the time, and randomly dropping the text
caption 50% of the time"; here a dropped embedding is the zero vector and a dropped caption is
all-zero context rows. Sampling with guidance s mixes the prediction with both conditions and the
one with neither, in one batched forward.

**Upsampler** (kind "unclip_upsampler"). A U-Net that reads the low-resolution image, enlarged
bilinearly to its output size, as extra input channels (SR3). In training the low-resolution
image is corrupted by a Gaussian blur ("for the first upsampling stage, we use gaussian blur",
§C / Appendix), which makes the model robust to the decoder's own artefacts. The paper's
upsamplers are not conditioned on the caption, and neither is this one. The paper goes
64 -> 256 -> 1024 px; this library's shapes go 32 -> 64 px.

Departures: GLIDE's text encoder also adds its last token to the timestep embedding; this one
does not (the CLIP embedding already sits there). The blur σ is drawn from ``blur_sigma`` in
low-resolution pixels, our choice for 32 px images (the paper does not state its range).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cvformers.config import ConfigError
from cvformers.diffusion.caption import CaptionDDPM, CaptionDDPMConfig
from cvformers.diffusion.model import DDPM, DDPMConfig
from cvformers.diffusion.prior import clip_space
from cvformers.diffusion.samplers import DiffusionSamplingConfig
from cvformers.registry import register_kind
from cvformers.vae.vqvae import VQVAE, VQVAEConfig


@dataclass
class DecoderConfig(CaptionDDPMConfig):
    """The ``[model]`` table of an unCLIP decoder run (a caption DDPM whose U-Net also reads a CLIP embedding)."""

    clip_dim: int = 64  # width of the CLIP image embedding (fixed by the CLIP run)
    clip_tokens: int = 4  # context tokens projected from the embedding (paper: four)
    vocab_size: int = 470  # caption token ids (the CLIP run's BPE); 0: no caption input
    emb_drop_prob: float = 0.1  # share of training images whose CLIP embedding is zeroed (paper: 10%)
    caption_drop_prob: float = 0.5  # share of training captions dropped (paper: 50%)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("clip_dim", "clip_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.emb_drop_prob < 1.0:
            raise ConfigError(f"model.emb_drop_prob must be in [0, 1), got {self.emb_drop_prob}")
        # the cond vector is the CLIP embedding here (not the pooled caption, see the module's departures)
        self.unet.cond_dim = self.clip_dim


@register_kind("unclip_decoder", DecoderConfig)
class UnCLIPDecoder(CaptionDDPM):
    """``loss(batch)`` (batch: ``image``, ``clip_image``, ``text``); ``sample(embeddings, text)``."""

    cfg: DecoderConfig

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        self.clip_to_tokens = nn.Linear(cfg.clip_dim, cfg.clip_tokens * cfg.text_width)

    def conditions(self, embedding: torch.Tensor, text: torch.Tensor | None,
                   keep_embedding: torch.Tensor | None = None,
                   keep_text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The U-Net's ``cond`` and ``context`` for raw CLIP image embeddings [B, clip_dim] and caption
        ids [B, text_len] (None: no caption); rows whose ``keep_*`` is False have that input dropped."""
        b = embedding.shape[0]
        z = clip_space(embedding)
        if keep_embedding is not None:
            z = z * keep_embedding.view(b, 1).to(z.dtype)
        context = rearrange(self.clip_to_tokens(z), "b (n w) -> b n w", n=self.cfg.clip_tokens)
        if self.cfg.vocab_size:
            context = torch.cat([context, self.encode_captions(text, b, keep_text)], dim=1)
        return {"cond": z, "context": context}

    def training_inputs(self, batch: dict, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        b = x0.shape[0]
        keep_embedding = torch.rand(b, device=x0.device) >= self.cfg.emb_drop_prob
        keep_text = torch.rand(b, device=x0.device) >= self.cfg.caption_drop_prob
        text = batch["text"].to(x0.device) if self.cfg.vocab_size else None
        return self.conditions(batch["clip_image"].to(x0.device), text, keep_embedding, keep_text)

    @torch.no_grad()
    def sample(self, embeddings: torch.Tensor, text: torch.Tensor | None = None,
               sampling: DiffusionSamplingConfig | None = None, generator: torch.Generator | None = None,
               progress: Callable[[Iterable], Iterable] | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One image [n, C, H, W] in [0, 1] per CLIP image embedding [n, clip_dim] (and caption).
        ``noise``: the x_T to start from (fixed across rows for interpolations, §3.2); None: drawn."""
        s = sampling or DiffusionSamplingConfig()
        device = next(self.parameters()).device
        embeddings = embeddings.to(device)
        n = len(embeddings)
        cond = self.conditions(embeddings, None if text is None else text.to(device))
        none = torch.zeros(n, dtype=torch.bool, device=device)
        null = self.conditions(embeddings, None, keep_embedding=none)
        x = self.run_sampler(n, s, cond, null, generator, progress, noise)
        return self.to_images(x)

    @property
    def image_size(self) -> int:
        """Side of the images it draws."""
        return self.cfg.unet.image_size


@dataclass
class LatentDecoderConfig(DecoderConfig):
    """The ``[model]`` table of an unCLIP decoder that draws a VQ-VAE's latent grid (``[model.vae]``:
    the frozen tokenizer's own config; ``unet.image_size`` and ``unet.in_channels`` follow from it)."""

    vae: VQVAEConfig = field(default_factory=VQVAEConfig)

    def __post_init__(self) -> None:
        if isinstance(self.vae, dict):
            from cvformers.config import from_dict

            self.vae = from_dict(VQVAEConfig, self.vae, "model.vae")
        super().__post_init__()
        v = self.vae
        if (self.unet.image_size, self.unet.in_channels) != (v.grid_size, latent_channels(v)):
            raise ConfigError(f"model.unet draws {self.unet.in_channels}x{self.unet.image_size}x{self.unet.image_size} "
                              f"but the VQ-VAE's latent grid is {latent_channels(v)}x{v.grid_size}x{v.grid_size}; "
                              "remove unet.image_size and unet.in_channels")


def latent_channels(vae: VQVAEConfig) -> int:
    """Channels of a VQ-VAE's code vectors at one cell: structure (+ colour, when factorised)."""
    return vae.code_dim + (vae.colour_dim if vae.colour_vocab_size else 0)


@register_kind("unclip_latent_decoder", LatentDecoderConfig)
class LatentDecoder(UnCLIPDecoder):
    """unCLIP's decoder in the latent grid of a frozen VQ-VAE, beside the paper's pixel decoder.

    Departure from unCLIP §2.1 (whose decoder diffuses pixels), as Kandinsky 2.x and Stable unCLIP
    do with their VQ / KL autoencoders (latent diffusion, Rombach et al. 2022, §3): the U-Net draws
    the grid of code vectors that the image tokenizer's decoder turns into pixels, so the tokenizer
    supplies the crisp shapes a small pixel U-Net learns slowly, and each step runs on an 8x8 grid
    instead of 32x32 pixels. Each channel of the code vectors is mapped linearly from its range
    over the codebook onto [-1, 1], so the sampler's clipping of x̂_0 keeps it inside the box of
    real codes. To draw an image, every cell of x̂_0 is snapped to its nearest codebook vector
    (structure and colour each in their own codebook, as the tokenizer quantises) and decoded.
    Training reads the images' code ids (``batch["image_ids"]``, computed once by the task); the
    loss gives each codebook's channels an equal share (``channel_weights``).
    """

    cfg: LatentDecoderConfig

    def __init__(self, cfg: LatentDecoderConfig):
        super().__init__(cfg)
        self.vae = VQVAE(cfg.vae)  # frozen: its weights are the tokenizer's, saved with the decoder
        self.vae.requires_grad_(False)

    @property
    def image_size(self) -> int:
        return self.cfg.vae.image_size

    def _ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel (low, high) of the codebook vectors, the box of the latent space."""
        lows, highs = zip(*[(q.codebook.amin(0), q.codebook.amax(0)) for q in self.vae.quantizers()])
        low, high = torch.cat(lows), torch.cat(highs)
        return low, (high - low).clamp(min=1e-6)

    def latents(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids [B, h, w] -> the model's x_0 [B, C, h, w] in [-1, 1]."""
        low, width = self._ranges()
        return (self.vae.code_vectors(ids) - low.view(-1, 1, 1)) / width.view(-1, 1, 1) * 2 - 1

    def nearest_ids(self, x: torch.Tensor) -> torch.Tensor:
        """The model's x̂_0 [B, C, h, w] -> the nearest code ids [B, h, w], one codebook at a time."""
        low, width = self._ranges()
        z = rearrange(x, "b c h w -> b h w c").float()
        z = (z + 1) / 2 * width + low
        parts, start = [], 0
        for q in self.vae.quantizers():
            dim = q.codebook.shape[1]
            flat = z[..., start:start + dim].reshape(-1, dim)
            parts.append(q.nearest(flat).view(z.shape[:3]))
            start += dim
        return self.vae.join_ids(parts)

    def clean_sample(self, batch: dict) -> torch.Tensor:
        return self.latents(batch["image_ids"].to(self.vae.quantizer.codebook.device))

    def channel_weights(self) -> torch.Tensor:
        """Each codebook's channels share an equal part of the loss: the 8 colour channels weigh as much
        as the 64 structure channels, since a wrong colour code is as visible as a wrong shape code."""
        dims = [q.codebook.shape[1] for q in self.vae.quantizers()]
        total = sum(dims)
        return torch.cat([torch.full((d,), total / (len(dims) * d)) for d in dims]).to(self.vae.quantizer.codebook)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.nearest_ids(x))


@dataclass
class UpsamplerConfig(DDPMConfig):
    """The ``[model]`` table of an unCLIP upsampler run; ``unet.image_size`` is the output side."""

    low_res: int = 32  # side of the image it enlarges
    blur_sigma: tuple[float, float] = (0.4, 0.6)  # range of the training blur's σ, in low-resolution pixels

    def __post_init__(self) -> None:
        super().__post_init__()
        self.blur_sigma = tuple(float(v) for v in self.blur_sigma)
        if len(self.blur_sigma) != 2 or not 0.0 <= self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ConfigError(f"model.blur_sigma must be [low, high] with 0 <= low <= high, got {list(self.blur_sigma)}")
        if self.low_res < 4 or self.low_res >= self.unet.image_size:
            raise ConfigError(f"model.low_res ({self.low_res}) must be at least 4 and below the output side "
                              f"model.unet.image_size ({self.unet.image_size})")
        if self.unet.num_classes:
            raise ConfigError("an upsampler is conditioned on a low-resolution image: remove model.unet.num_classes")
        self.unet.cond_channels = self.unet.in_channels


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image [B, C, H, W] with its own σ [B] (in pixels) by a separable Gaussian kernel."""
    radius = max(1, int(3 * float(sigma.max()) + 0.5))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None].to(images.dtype) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [B, K]
    b, c, h, w = images.shape
    x = rearrange(images, "b c h w -> 1 (b c) h w")
    k = kernel.repeat_interleave(c, dim=0)  # one kernel per (image, channel) group
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    return rearrange(x, "1 (b c) h w -> b c h w", b=b)


@register_kind("unclip_upsampler", UpsamplerConfig)
class Upsampler(DDPM):
    """``loss(batch)`` (batch: ``image`` at the output size); ``sample(low_res_images)``."""

    cfg: UpsamplerConfig

    def enlarge(self, low: torch.Tensor) -> torch.Tensor:
        """Low-resolution images in [-1, 1] -> the U-Net's conditioning channels at the output size."""
        side = self.cfg.unet.image_size
        return F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)

    def training_inputs(self, batch: dict, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        low = F.interpolate(x0, size=(self.cfg.low_res,) * 2, mode="area")  # what the decoder would draw
        lo, hi = self.cfg.blur_sigma
        if hi > 0:
            sigma = lo + (hi - lo) * torch.rand(len(x0), device=x0.device)
            low = gaussian_blur(low, sigma)
        return {"cond_image": self.enlarge(low)}

    @torch.no_grad()
    def sample(self, low_res: torch.Tensor, sampling: DiffusionSamplingConfig | None = None,
               generator: torch.Generator | None = None,
               progress: Callable[[Iterable], Iterable] | None = None) -> torch.Tensor:
        """Images [n, C, low_res, low_res] in [0, 1] -> [n, C, side, side] in [0, 1]."""
        s = sampling or DiffusionSamplingConfig()
        if s.guidance != 1.0:
            raise ConfigError("the upsampler has no condition to guide; use guidance 1")
        device = next(self.parameters()).device
        if low_res.shape[-1] != self.cfg.low_res or low_res.shape[-2] != self.cfg.low_res:
            raise ConfigError(f"the upsampler enlarges {self.cfg.low_res}x{self.cfg.low_res} images, got "
                              f"{low_res.shape[-2]}x{low_res.shape[-1]}")
        cond = {"cond_image": self.enlarge(low_res.to(device) * 2 - 1)}
        return self.to_images(self.run_sampler(len(low_res), s, cond, None, generator, progress))


__all__ = ["DecoderConfig", "LatentDecoder", "LatentDecoderConfig", "UnCLIPDecoder", "Upsampler", "UpsamplerConfig", "gaussian_blur"]
