"""DALL-E stage one: the discrete VAE (Ramesh et al. 2021, §2.1 and appendix A).

An image of side ``image_size`` becomes a ``grid_size × grid_size`` grid of codebook ids.
The architecture follows OpenAI's released dVAE (github openai/DALL-E, ``dall_e/encoder.py``,
``decoder.py``): groups of bottleneck residual blocks whose residual branch is multiplied by
``post_gain = 1 / n_layers²`` (§2.1: "multiplication of the outgoing activations from the
encoder and decoder resblocks by a small constant"), max-pooling between encoder groups,
nearest-neighbour upsampling between decoder groups, a 7×7 input convolution, and 1×1
convolutions around the code grid (§2.1: "1×1 convolutions at the end of the encoder and the
beginning of the decoder"). Group ``i`` of the encoder is ``2^(i-1) · n_hid`` channels wide
and the decoder mirrors it; the release has ``group_count = 4``, this module takes any count.

Training maximises the ELBO (appendix A.2, A.3):

    loss = ( -log p(x | z) + β · KL(q(z | x) || uniform) ) / (C · H · W)

with ``z`` a Gumbel-softmax relaxation of the categorical posterior at temperature τ, and
``p(x | z)`` the logit-Laplace density over pixels mapped to [ε, 1 − ε]. τ falls from 1 to
1/16 and β rises from 0 to 6.6 on cosine schedules (appendix A.2). The paper's counts (τ over
150,000 updates, β over 5,000) are longer than a CPU run of a few hundred or thousand steps;
with ``fit_schedules_to_run`` (the default) a schedule longer than the run is compressed to the
run's length, so τ reaches 1/16 and β reaches its final value at the last step. Scaling the
counts by the paper's proportions instead (τ over the first 5% of the run, β over 0.17%)
failed in short runs (measured on shapes, 200-400 steps): with β = 6.6 from the first steps
the posterior collapsed onto the prior (KL 0.002 nats a position, PSNR 12.9 dB, that of a
black image); with β = 0, τ at 1/16 after 10 steps left one code in use (perplexity 1.0).

Options that depart from the release, all off by default (docs/results.md, "Image tokenizers"):
``post_gain``, the residual-branch multiplier (the release's 1/n_layers² is 1/9 in a 3-block
model and leaves the branches nearly silent in a short run), and ``recon_estimate = "mean"``,
images from the mean of the logit-Laplace (A.3) instead of the release's sigmoid(μ), its median:
the mean is the estimate with the least expected squared error; with the squared-error term,
``mse_output = "linear"``, μ itself as the pixel instead of sigmoid(μ) (whose slope near the dark
background down-weights errors there, though PSNR weighs every pixel alike).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cvformers.config import ConfigError
from cvformers.vae.metrics import code_perplexity, psnr
from cvformers.registry import register_kind


RECON_LOSSES = ("logit_laplace", "mse")
RECON_ESTIMATES = ("median", "mean")
MSE_OUTPUTS = ("sigmoid", "linear")


@dataclass
class DVAEConfig:
    image_size: int = 256  # input side in pixels (square); must be divisible by 2^(group_count-1)
    channels: int = 3  # image channels (3 RGB, 1 grey)
    vocab_size: int = 8192  # codebook size K (DALL-E: 8192)
    n_hid: int = 256  # width of encoder group 1; group i is 2^(i-1)·n_hid wide (DALL-E: 256)
    n_blk_per_group: int = 2  # residual blocks per group (DALL-E: 2)
    group_count: int = 4  # number of groups; grid_size = image_size / 2^(group_count-1) (DALL-E: 4)
    n_init: int = 128  # decoder: channels of the 1×1 conv that embeds the codes (release: 128)
    logit_laplace_eps: float = 0.1  # pixels are mapped to [ε, 1-ε] (appendix A.3)
    # reconstruction term: "logit_laplace" (the paper, A.3) or "mse" (not the paper: squared error
    # of sigmoid(μ) in the mapped pixel space, as DALLE-pytorch's DiscreteVAE trains; much sharper
    # in short CPU runs, where the logit-Laplace median falls to the background; docs/results.md)
    recon_loss: str = "logit_laplace"
    kl_weight: float = 6.6  # final β of the KL term (appendix A.2)
    kl_warmup_steps: int = 5_000  # β rises 0 -> kl_weight on a cosine over these updates (A.2)
    tau_start: float = 1.0  # Gumbel-softmax temperature at step 0 (A.2)
    tau_end: float = 1.0 / 16  # temperature after annealing (A.2)
    tau_anneal_steps: int = 150_000  # τ falls tau_start -> tau_end on a cosine over these updates (A.2)
    fit_schedules_to_run: bool = True  # a run shorter than a schedule runs that schedule over all its steps
    # --- departures from the release for small CPU-trained models (docs/results.md, "Image tokenizers") ---
    post_gain: float | None = None  # residual-branch multiplier; None = the release's 1 / (group_count·n_blk_per_group)²
    # images from decoder statistics: "median" = sigmoid(μ) (the release) or "mean" = E[sigmoid(y)],
    # y ~ Laplace(μ, b), the logit-Laplace posterior mean (A.3), which minimises expected squared error
    recon_estimate: str = "median"
    # with recon_loss = "mse": the decoder's pixel is "sigmoid"(μ) (the release's squashing) or μ
    # itself, "linear" (clamped to the pixel range when decoding; DALLE-pytorch's DiscreteVAE output)
    mse_output: str = "sigmoid"

    def __post_init__(self) -> None:
        for name in ("image_size", "channels", "vocab_size", "n_hid", "n_blk_per_group", "group_count", "n_init"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_hid % 4:
            raise ConfigError(f"model.n_hid must be a multiple of 4 (bottleneck width n_hid/4), got {self.n_hid}")
        if self.image_size % 2 ** (self.group_count - 1):
            raise ConfigError(
                f"model.image_size {self.image_size} is not divisible by 2^(group_count-1) = "
                f"{2 ** (self.group_count - 1)}"
            )
        if not 0.0 < self.logit_laplace_eps < 0.5:
            raise ConfigError(f"model.logit_laplace_eps must be in (0, 0.5), got {self.logit_laplace_eps}")
        if self.recon_loss not in RECON_LOSSES:
            raise ConfigError(f"model.recon_loss must be one of {', '.join(RECON_LOSSES)}, got {self.recon_loss!r}")
        if self.tau_start <= 0 or self.tau_end <= 0:
            raise ConfigError("model.tau_start and model.tau_end must be > 0")
        if self.post_gain is not None and not self.post_gain > 0:
            raise ConfigError(f"model.post_gain must be > 0 (or omitted for the release's), got {self.post_gain}")
        if self.recon_estimate not in RECON_ESTIMATES:
            raise ConfigError(
                f"model.recon_estimate must be one of {', '.join(RECON_ESTIMATES)}, got {self.recon_estimate!r}"
            )
        if self.recon_estimate == "mean" and self.recon_loss != "logit_laplace":
            raise ConfigError('model.recon_estimate = "mean" needs recon_loss = "logit_laplace" (it uses the scale b)')
        if self.mse_output not in MSE_OUTPUTS:
            raise ConfigError(f"model.mse_output must be one of {', '.join(MSE_OUTPUTS)}, got {self.mse_output!r}")
        if self.mse_output == "linear" and self.recon_loss != "mse":
            raise ConfigError('model.mse_output = "linear" needs recon_loss = "mse" (the logit-Laplace μ is a logit)')

    @property
    def grid_size(self) -> int:
        return self.image_size // 2 ** (self.group_count - 1)


# --- pixels and the logit-Laplace likelihood (appendix A.3) ---------------------------------


def map_pixels(x: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """[0,1] -> [ε, 1-ε]: the logit-Laplace density lives on (0,1), so keep clear of its ends."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


def logit_laplace_log_prob(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log f(x | μ, b) = -log(2 b x (1-x)) - |logit(x) - μ| / b, elementwise (appendix A.3, eq. 2).

    ``x`` must lie in (0, 1) (map it first); ``log_b`` is the log of the scale b.
    """
    return (
        -math.log(2.0)
        - log_b
        - torch.log(x)
        - torch.log1p(-x)
        - (torch.logit(x) - mu).abs() * torch.exp(-log_b)
    )


def logit_laplace_mean(mu: torch.Tensor, log_b: torch.Tensor, eps: float = 0.1, points: int = 32) -> torch.Tensor:
    """E[unmap(sigmoid(y))] for y ~ Laplace(μ, b): the mean of the pixel under the logit-Laplace
    density of A.3, the estimate with the least expected squared error (sigmoid(μ) is its median).

    No closed form; a ``points``-node quantile rule: y_k = μ + b·F⁻¹((k + ½) / points), with F⁻¹
    the standard Laplace quantile, and the mean of the pixels they give.
    """
    u = (torch.arange(points, dtype=torch.float64) + 0.5) / points - 0.5
    s = (-torch.sign(u) * torch.log1p(-2 * u.abs())).to(mu.dtype)  # Laplace(0, 1) quantiles
    y = mu.unsqueeze(-1) + torch.exp(log_b).unsqueeze(-1) * s
    return unmap_pixels(torch.sigmoid(y), eps).mean(-1)


def kl_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """KL(q || uniform over K) = Σ_k q_k log q_k + log K, for each position (summed over ``dim``)."""
    log_q = F.log_softmax(logits, dim=dim)
    return (log_q.exp() * log_q).sum(dim) + math.log(logits.shape[dim])


def cosine_ramp(step: int, steps: int) -> float:
    """0 at step 0 -> 1 at ``steps`` (and after), on half a cosine."""
    if steps <= 0:
        return 1.0
    t = min(max(step, 0) / steps, 1.0)
    return 0.5 * (1.0 - math.cos(math.pi * t))


# --- building blocks (release: dall_e/utils.py Conv2d, encoder.py, decoder.py) ----------------


# Activations run channels-last (NHWC): measured ~20% faster training steps on CPU than NCHW.
# Weights stay in the default layout (same speed, and state dicts stay contiguous for safetensors).
CONV_LAYOUT = torch.channels_last


def conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    """A 'same' convolution with the release's init: weights N(0, 1/(n_in·k²)), zero bias."""
    layer = nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)
    nn.init.normal_(layer.weight, std=1.0 / math.sqrt(n_in * kernel**2))
    nn.init.zeros_(layer.bias)
    return layer


class ResBlock(nn.Module):
    """Bottleneck residual block: skip(x) + post_gain · conv4(relu(conv3(relu(conv2(relu(conv1(relu(x)))))))).

    Encoder blocks use kernels (3, 3, 3, 1), decoder blocks (1, 3, 3, 3) as in the release;
    the bottleneck is n_out / 4 wide; ``post_gain`` is 1 / n_layers² unless given; the skip is
    a 1×1 conv only where the width changes.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_layers: int,
        kernels: tuple[int, int, int, int],
        post_gain: float | None = None,
    ):
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1.0 / n_layers**2 if post_gain is None else post_gain
        self.skip = conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.conv1 = conv(n_in, hid, kernels[0])
        self.conv2 = conv(hid, hid, kernels[1])
        self.conv3 = conv(hid, hid, kernels[2])
        self.conv4 = conv(hid, n_out, kernels[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(x))
        h = self.conv2(F.relu(h))
        h = self.conv3(F.relu(h))
        h = self.conv4(F.relu(h))
        return self.skip(x) + self.post_gain * h


class Group(nn.Module):
    def __init__(self, n_in: int, n_out: int, cfg: DVAEConfig, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_layers = cfg.group_count * cfg.n_blk_per_group
        post_gain = getattr(cfg, "post_gain", None)  # the VQ-VAE's config shares these stacks without it
        self.blocks = nn.ModuleList(
            ResBlock(n_in if i == 0 else n_out, n_out, n_layers, kernels, post_gain)
            for i in range(cfg.n_blk_per_group)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Encoder(nn.Module):
    """Mapped pixels [B,C,H,W] -> code logits [B,K,h,w] (or ``n_out`` features, for the VQ-VAE)."""

    def __init__(self, cfg: DVAEConfig, n_out: int | None = None, n_in: int | None = None):
        super().__init__()
        widths = [2**i * cfg.n_hid for i in range(cfg.group_count)]
        self.stem = conv(n_in or cfg.channels, cfg.n_hid, 7)
        self.groups = nn.ModuleList(
            Group(widths[i - 1] if i else cfg.n_hid, widths[i], cfg, kernels=(3, 3, 3, 1))
            for i in range(cfg.group_count)
        )
        self.head = conv(widths[-1], n_out or cfg.vocab_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.contiguous(memory_format=CONV_LAYOUT))
        for i, group in enumerate(self.groups):
            x = group(x)
            if i < len(self.groups) - 1:
                x = F.max_pool2d(x, 2)  # A.1: max-pooling gave a better ELBO than average-pooling
        return self.head(F.relu(x))


class Decoder(nn.Module):
    """Codes (one-hot or relaxed) [B,K,h,w] -> logit-Laplace statistics [B,2C,H,W] (μ then log b).

    ``n_in`` / ``n_out`` override the code and output widths (the VQ-VAE feeds code vectors).
    """

    def __init__(self, cfg: DVAEConfig, n_in: int | None = None, n_out: int | None = None):
        super().__init__()
        widths = [2 ** (cfg.group_count - 1 - i) * cfg.n_hid for i in range(cfg.group_count)]
        self.stem = conv(n_in or cfg.vocab_size, cfg.n_init, 1)
        self.groups = nn.ModuleList(
            Group(widths[i - 1] if i else cfg.n_init, widths[i], cfg, kernels=(1, 3, 3, 3))
            for i in range(cfg.group_count)
        )
        self.head = conv(widths[-1], n_out or 2 * cfg.channels, 1)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The stem applied to one-hot codes, as a lookup: column k of the 1×1 conv is code k's vector."""
        table = self.stem.weight[:, :, 0, 0].t()  # [K, n_init]
        return rearrange(F.embedding(ids, table) + self.stem.bias, "b h w c -> b c h w")

    def forward(self, z: torch.Tensor | None = None, *, ids: torch.Tensor | None = None) -> torch.Tensor:
        # the lookup comes out channels-last already ([b h w c] seen as [b c h w])
        x = self.embed_ids(ids) if ids is not None else self.stem(z.contiguous(memory_format=CONV_LAYOUT))
        for i, group in enumerate(self.groups):
            x = group(x)
            if i < len(self.groups) - 1:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.head(F.relu(x))


# --- the model ---------------------------------------------------------------------------------


@register_kind("dvae", DVAEConfig)
class DiscreteVAE(nn.Module):
    """The dVAE with the image-tokenizer face: encode(images)->ids[B,h,w], decode(ids)->images."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.num_tokens = cfg.vocab_size
        self.grid_size = cfg.grid_size
        self.image_size = cfg.image_size
        self.channels = cfg.channels
        self.on_train_step(0, 0)

    # schedules (appendix A.2): pure functions of the step so that a resumed run is exact
    def schedule_steps(self, steps: int, total_steps: int) -> int:
        if self.cfg.fit_schedules_to_run and total_steps > 0:
            return min(steps, total_steps)
        return steps

    def tau_at(self, step: int, total_steps: int) -> float:
        ramp = cosine_ramp(step, self.schedule_steps(self.cfg.tau_anneal_steps, total_steps))
        return self.cfg.tau_start + (self.cfg.tau_end - self.cfg.tau_start) * ramp

    def beta_at(self, step: int, total_steps: int) -> float:
        return self.cfg.kl_weight * cosine_ramp(step, self.schedule_steps(self.cfg.kl_warmup_steps, total_steps))

    def on_train_step(self, step: int, total_steps: int) -> None:
        self.tau = self.tau_at(step, total_steps)
        self.beta = self.beta_at(step, total_steps)

    # the tokenizer face
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0,1] [B,C,H,W] -> encoder logits [B,K,h,w]."""
        self._check_images(images)
        return self.encoder(map_pixels(images, self.cfg.logit_laplace_eps))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).argmax(dim=1)

    def stats_to_images(self, stats: torch.Tensor) -> torch.Tensor:
        """Decoder output -> images in [0,1], unmapped: sigmoid(μ), the median of the logit-Laplace
        (the release's usage), or with ``recon_estimate = "mean"`` its mean (``logit_laplace_mean``)."""
        mu = stats[:, : self.channels]
        if self.cfg.recon_estimate == "mean":
            return logit_laplace_mean(mu, stats[:, self.channels :], self.cfg.logit_laplace_eps)
        if self.cfg.mse_output == "linear":
            return unmap_pixels(mu, self.cfg.logit_laplace_eps)
        return unmap_pixels(torch.sigmoid(mu), self.cfg.logit_laplace_eps)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 3 or ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"decode expects integer ids [B,h,w], got {tuple(ids.shape)} {ids.dtype}")
        return self.stats_to_images(self.decoder(ids=ids.long()))

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"expected images [B,{self.channels},H,W], got {tuple(images.shape)}")

    # training objective
    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["image"] if isinstance(batch, dict) else batch
        eps = self.cfg.logit_laplace_eps
        x = map_pixels(images, eps)
        logits = self.logits(images)
        if self.training:
            z = F.gumbel_softmax(logits, tau=self.tau, hard=False, dim=1)  # relaxed sample of q(z|x)
        else:
            # evaluation: the hard argmax codes, i.e. exactly what encode/decode use
            z = F.one_hot(logits.argmax(1), self.num_tokens).permute(0, 3, 1, 2).to(logits.dtype)
        stats = self.decoder(z)
        mu, log_b = stats.float().chunk(2, dim=1)
        b, c, h, w = images.shape
        if self.cfg.recon_loss == "mse":  # Gaussian of fixed variance 1/2 up to a constant; log_b unused
            pixel = mu if self.cfg.mse_output == "linear" else torch.sigmoid(mu)
            nll = (pixel - x.float()).square().sum(dim=(1, 2, 3))
        else:
            nll = -logit_laplace_log_prob(x.float(), mu, log_b).sum(dim=(1, 2, 3))  # per image
        kl = kl_to_uniform(logits.float()).sum(dim=(1, 2))  # per image, over the h·w positions
        # A.2: divide by the number of pixel values, so the KL weight per position is β·h·w/(C·H·W)
        loss = (nll + self.beta * kl).mean() / (c * h * w)
        with torch.no_grad():
            recon = self.stats_to_images(stats.float())
            metrics = {
                "recon_nll": (nll.mean() / (c * h * w)).item(),
                "kl": (kl.mean() / (self.grid_size**2)).item(),  # nats per code position
                "psnr": psnr(recon, images.float()).item(),
                "perplexity": code_perplexity(logits.argmax(1), self.num_tokens),
                "tau": self.tau,
                "beta": self.beta,
            }
        return loss, metrics
