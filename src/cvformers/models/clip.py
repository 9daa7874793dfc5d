"""CLIP: contrastive language–image pre-training (Radford et al. 2021).

An image tower and a text tower each map their input to one vector in a shared space;
training pulls the N matching (image, caption) pairs of a batch together and pushes the
N² - N others apart with a symmetric cross-entropy over the N×N similarity matrix
(CLIP §2.3, figure 3). DALL-E (§2.3) uses such a model to rerank its samples.

State-dict keys follow OpenAI's release (and open_clip): ``visual.*`` (see clip_visual.py),
``token_embedding``, ``positional_embedding``, ``transformer.resblocks.*``, ``ln_final``,
``text_projection``, ``logit_scale``. ``load_openai_state_dict`` reads their checkpoints.

Large batches: CLIP trained with N = 32 768. Gradient accumulation does not help a
contrastive loss (each micro-batch would only see its own negatives), so with
``micro_batch > 0`` the loss uses gradient caching (Gao et al. 2021, "Scaling deep
contrastive learning batch size under memory limited setup"): embed every micro-batch
without a graph, compute the full-batch loss on the embeddings, then during backward
re-embed each micro-batch with a graph and push the cached embedding gradients through it.
Memory is that of one micro-batch plus the N×D embeddings; the result equals the plain
full-batch gradient. Across processes (torchrun / DDP) the features of every process are
gathered, so the negatives are the global batch (``gather_distributed``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cvformers.config import ConfigError
from cvformers.models.clip_visual import ClipTransformer, ClipVisionTransformer, TrunkTower
from cvformers.registry import register_kind

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the pixel statistics OpenAI normalised with
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPConfig:
    embed_dim: int = 64  # size of the shared image-text embedding
    # image tower
    image_encoder: str = "vit"  # "vit" (CLIP's own, OpenAI layout) or a cvformers.models.vision name
    init_from: str = ""  # (registry image encoders) a dino or classifier run whose backbone starts the image tower
    image_size: int = 32  # input resolution (square)
    in_channels: int = 3  # image channels; 1-channel inputs are repeated to 3 when this is 3
    patch_size: int = 4  # ViT patch side in pixels
    vision_width: int = 64  # ViT token width
    vision_layers: int = 2  # ViT depth
    vision_heads: int = 2  # ViT attention heads (OpenAI: width // 64)
    image_mean: tuple[float, float, float] = OPENAI_MEAN  # per-channel mean subtracted from [0,1] pixels
    image_std: tuple[float, float, float] = OPENAI_STD  # per-channel std the pixels are divided by
    # text tower
    tokenizer: Literal["clip", "bpe"] = "bpe"  # "clip": OpenAI's BPE (49408 ids); "bpe": cvformers.text
    vocab_size: int = 512  # rows of token_embedding (for "bpe": tokenizer vocab + context_length pad ids)
    real_vocab_size: int = 0  # "bpe" only: ids >= this are per-position pads (0: none, read the last token)
    context_length: int = 32  # text tokens per caption (OpenAI: 77)
    text_width: int = 64  # text transformer width
    text_layers: int = 2  # text transformer depth
    text_heads: int = 2  # text attention heads
    text_pool: Literal["argmax", "first_pad"] = "first_pad"  # where the caption vector is read, see pool_text
    # both
    mlp_ratio: float = 4.0  # MLP hidden width / width
    quick_gelu: bool = False  # x*sigmoid(1.702x) as OpenAI trained; open_clip's default is exact GELU
    init_logit_scale: float = math.log(1 / 0.07)  # temperature init (CLIP §2.5)
    max_logit_scale: float = 100.0  # the scale exp(logit_scale) is clipped at (CLIP §2.5)
    micro_batch: int = 0  # >0: gradient-cached loss over micro-batches of this size (module docstring)
    gather_distributed: bool = True  # under DDP, every process's pairs are negatives for all (global batch)


# Named presets; ``clip_config(name, **overrides)`` builds one.
PRESETS: dict[str, dict] = {
    # a few seconds per hundred steps on CPU; for the 32x32 `shapes` set and tests
    "tiny": dict(embed_dim=64, image_size=32, patch_size=4, vision_width=64, vision_layers=2,
                 vision_heads=2, text_width=64, text_layers=2, text_heads=2, context_length=32),
    "small": dict(embed_dim=128, image_size=32, patch_size=4, vision_width=128, vision_layers=4,
                  vision_heads=4, text_width=128, text_layers=4, text_heads=4, context_length=32),
    # the shape of OpenAI's ViT-B/32 (and open_clip's "ViT-B-32-quickgelu")
    "ViT-B-32": dict(embed_dim=512, image_size=224, patch_size=32, vision_width=768, vision_layers=12,
                     vision_heads=12, tokenizer="clip", vocab_size=49408, context_length=77,
                     text_width=512, text_layers=12, text_heads=8, text_pool="argmax", quick_gelu=True),
}


def clip_config(name: str = "tiny", **overrides) -> CLIPConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown CLIP preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(CLIPConfig(), **{**PRESETS[name], **overrides})


@register_kind("clip", CLIPConfig)
class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.image_encoder == "vit":
            self.visual = ClipVisionTransformer(
                cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_layers,
                cfg.vision_heads, cfg.embed_dim, cfg.in_channels, cfg.mlp_ratio, cfg.quick_gelu)
        else:
            self.visual = TrunkTower(cfg.image_encoder, cfg.embed_dim, cfg.image_size, cfg.in_channels)
        # Text tower (CLIP §2.4): a GPT-2-style causal transformer over BPE tokens; causal so
        # that it could be initialised from a language model, as the paper notes.
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.transformer = ClipTransformer(cfg.text_width, cfg.text_layers, cfg.text_heads,
                                       cfg.mlp_ratio, cfg.quick_gelu)
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        # Learned temperature, parametrised as a log so it stays positive (CLIP §2.5).
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.register_buffer("pixel_mean", torch.tensor(cfg.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.image_std).view(1, -1, 1, 1), persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.text_width ** -0.5)

    # --- towers ---------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Images in [0, 1], [B, C, H, W] at cfg.image_size -> [B, embed_dim]."""
        if images.shape[1] == 1 and self.cfg.in_channels == 3:
            images = images.expand(-1, 3, -1, -1)  # grey datasets (MNIST) through an RGB tower
        x = (images - self.pixel_mean) / self.pixel_std
        features = self.visual(x)
        return F.normalize(features, dim=-1) if normalize else features

    def pool_text(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Read each caption's vector at its end-of-text token (CLIP §2.4).

        "argmax": OpenAI's trick — the EOT id (49407) is the largest id, so argmax finds it.
        "first_pad": cvformers' BPE has no EOT id; its captions are followed by per-position
        pad ids (>= real_vocab_size, DALL-E §2.2). The first pad plays CLIP's EOT: a token of
        its own right after the caption that, through causal attention, has seen all of it.
        A caption that fills the context is read at its last token.
        """
        if self.cfg.text_pool == "argmax":
            pos = text.argmax(dim=-1)
        else:
            real = text < self.cfg.real_vocab_size if self.cfg.real_vocab_size else torch.ones_like(text, dtype=torch.bool)
            pos = real.sum(dim=-1).clamp(max=text.shape[1] - 1)  # real tokens are a prefix
        return x[torch.arange(len(x), device=x.device), pos]

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids [B, context_length] -> [B, embed_dim]."""
        if text.shape[1] != self.cfg.context_length:
            raise ValueError(f"text has {text.shape[1]} tokens, the model expects {self.cfg.context_length}")
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x, causal=True))
        features = self.pool_text(x, text) @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clipped at max_logit_scale (CLIP §2.5: "clipped to prevent
        scaling the logits by more than 100"). OpenAI clamps the parameter after each
        optimizer step; clamping here in the forward gives the same logits without a hook
        in the training loop (the gradient is zero while clipped)."""
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    def forward(self, images: torch.Tensor, text: torch.Tensor):
        """-> (normalised image features, normalised text features, scale)."""
        return self.encode_image(images, normalize=True), self.encode_text(text, normalize=True), self.scale()

    # --- training -------------------------------------------------------------------------
    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        images, text = batch["image"], batch["text"]
        _, processes = world()
        if "negative_text" in batch or "negative_image" in batch:
            return self._loss_with_negatives(images, text, batch.get("negative_text"), batch.get("negative_image"))
        if 0 < self.cfg.micro_batch < len(images):
            if processes > 1:
                raise ConfigError("model.micro_batch (gradient caching) does not run under DDP: its "
                                  "inner backward passes would fire DDP's gradient hooks once per "
                                  "micro-batch; set micro_batch = 0 (the batch is gathered across processes)")
            image_features, text_features = GradCachedEmbed.apply(
                self.logit_scale, self, images, text, self.cfg.micro_batch)
        else:
            image_features = self.encode_image(images, normalize=True)
            text_features = self.encode_text(text, normalize=True)
        scale = self.scale()
        if processes > 1 and self.cfg.gather_distributed and self.training:
            loss, logits, labels = distributed_clip_loss(image_features, text_features, scale)
        else:
            loss, logits = clip_loss(image_features, text_features, scale)
            labels = torch.arange(len(logits), device=logits.device)
        with torch.no_grad():
            metrics = {
                "loss": loss.item(),
                "acc_i2t": (logits.argmax(1) == labels).float().mean().item(),
                "logit_scale": scale.item(),
            }
            if logits.shape[0] == logits.shape[1]:
                metrics["acc_t2i"] = (logits.argmax(0) == labels).float().mean().item()
        return loss, metrics

    def _loss_with_negatives(self, images, text, negative_text=None,
                             negative_images=None) -> tuple[torch.Tensor, dict[str, float]]:
        """Contrastive loss with hard negatives on either side. NegCLIP (Yuksekgonul et al. 2023, §5):
        each image picks its caption among the batch's captions and their hard negatives; with
        negative images (TripletCLIP, Patel et al. 2024) each caption likewise picks its image among
        the batch's images and theirs. Logits [N(+N) images, N(+N) captions], true pairs first.
        One process, one pass (gradient caching and DDP gathering are not combined with it)."""
        if world()[1] > 1 or 0 < self.cfg.micro_batch < len(images):
            raise ConfigError("hard negatives run on one process without gradient caching: set model.micro_batch "
                              "= 0 and train on one process, or text.hard_negatives = text.hard_negative_images = false")
        n = len(images)
        image_features = self.encode_image(images if negative_images is None else torch.cat([images, negative_images]),
                                           normalize=True)
        text_features = self.encode_text(text if negative_text is None else torch.cat([text, negative_text]),
                                         normalize=True)
        scale = self.scale()
        logits = scale * image_features @ text_features.t()
        labels = torch.arange(n, device=logits.device)
        loss_i = F.cross_entropy(logits[:n], labels)  # each image among all captions
        loss_t = F.cross_entropy(logits[:, :n].t(), labels)  # each caption among all images
        loss = (loss_i + loss_t) / 2
        with torch.no_grad():
            own = logits[labels, labels]
            metrics = {"loss": loss.item(), "acc_i2t": (logits[:n].argmax(1) == labels).float().mean().item(),
                       "acc_t2i": (logits[:, :n].argmax(0) == labels).float().mean().item(), "logit_scale": scale.item()}
            if negative_text is not None:
                metrics["acc_vs_negative"] = (own > logits[labels, labels + n]).float().mean().item()
            if negative_images is not None:
                metrics["acc_vs_negative_image"] = (own > logits[labels + n, labels]).float().mean().item()
        return loss, metrics


# --- the contrastive loss, over one batch, across processes, over micro-batches ------------
def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of CLIP figure 3: (CE over rows + CE over columns) / 2.

    Features must be L2-normalised; ``logit_scale`` is the (clipped) multiplier exp(t).
    Returns (loss, logits_per_image [N, N]).
    """
    logits_per_image = logit_scale * image_features @ text_features.t()
    labels = torch.arange(len(logits_per_image), device=logits_per_image.device)
    loss_i = F.cross_entropy(logits_per_image, labels)  # each image picks its caption
    loss_t = F.cross_entropy(logits_per_image.t(), labels)  # each caption picks its image
    return (loss_i + loss_t) / 2, logits_per_image


def world() -> tuple[int, int]:
    """(rank, processes) of the running torch.distributed group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distributed_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                          logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss over the global batch of every process (CLIP trained on 32k pairs over many GPUs).

    Each process gathers all processes' features (with gradient, ``GatherWithGrad``) and
    scores its own n rows against all R*n columns. Averaged over processes — what DDP does
    to gradients — this is exactly the gradient of ``clip_loss`` on the concatenated batch.
    Needs equal per-process batches. Returns (loss, local logits_per_image [n, R*n], labels [n]).
    """
    rank, _ = world()
    all_images = GatherWithGrad.apply(image_features)
    all_texts = GatherWithGrad.apply(text_features)
    n = len(image_features)
    labels = torch.arange(n, device=image_features.device) + rank * n
    logits_per_image = logit_scale * image_features @ all_texts.t()
    logits_per_text = logit_scale * text_features @ all_images.t()
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    return loss, logits_per_image, labels


class GatherWithGrad(torch.autograd.Function):
    """[n, D] on each of R processes -> [R*n, D] on every one; the backward sends each slice's
    gradient, summed over the processes whose losses used it, back to the slice's owner."""

    @staticmethod
    def forward(ctx, x):
        rank, processes = world()
        parts = [torch.empty_like(x) for _ in range(processes)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank, len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum of every process's d loss_r / d gathered
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


class GradCachedEmbed(torch.autograd.Function):
    """Embed a large batch micro-batch by micro-batch; gradient caching (Gao et al. 2021).

    Forward: every micro-batch is embedded without a graph -> full [N, D] features.
    Backward receives d loss / d features for the whole batch (the "gradient cache"), then for
    each micro-batch re-runs its forward with a graph and backpropagates the cached slice
    into the parameters. Whatever scales the loss (AMP's GradScaler, 1/accumulation) scales
    these gradients too, since they arrive through autograd. The RNG state of each
    micro-batch's first forward is restored for its second, so dropout masks agree.

    ``anchor`` is any tensor requiring grad (the model's logit_scale): autograd only calls
    a Function's backward when an input requires grad; it gets no gradient from here.
    Not for DDP: the inner backward calls would fire DDP's gradient hooks per micro-batch.
    """

    @staticmethod
    def forward(ctx, anchor, model: CLIP, images, text, micro_batch: int):
        ctx.model, ctx.micro_batch = model, micro_batch
        ctx.save_for_backward(images, text)
        ctx.rng_states = []
        image_parts, text_parts = [], []
        for img, txt in zip(images.split(micro_batch), text.split(micro_batch)):
            ctx.rng_states.append(_rng_state(images.device))
            image_parts.append(model.encode_image(img, normalize=True))
            text_parts.append(model.encode_text(txt, normalize=True))
        return torch.cat(image_parts), torch.cat(text_parts)

    @staticmethod
    def backward(ctx, grad_image, grad_text):
        images, text = ctx.saved_tensors
        model, mb = ctx.model, ctx.micro_batch
        chunks = zip(images.split(mb), text.split(mb), grad_image.split(mb), grad_text.split(mb),
                     ctx.rng_states)
        for img, txt, g_img, g_txt, rng in chunks:
            with torch.random.fork_rng(devices=_cuda_devices(img.device)), torch.enable_grad():
                _set_rng_state(rng, img.device)
                outputs = (model.encode_image(img, normalize=True), model.encode_text(txt, normalize=True))
                torch.autograd.backward(outputs, (g_img, g_txt))
        return None, None, None, None, None


def _cuda_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# --- OpenAI / open_clip checkpoints ------------------------------------------------------
def config_from_state_dict(sd: dict[str, torch.Tensor], quick_gelu: bool = True) -> CLIPConfig:
    """Infer the ViT-CLIP shape from an OpenAI / open_clip state dict (as OpenAI's build_model).

    Heads are width // 64 as in every released ViT CLIP. Whether the checkpoint was trained
    with QuickGELU cannot be read from the weights: OpenAI's were (the default here), most
    of open_clip's LAION ones were not (``quick_gelu=False``).
    """
    if "visual.conv1.weight" not in sd:
        raise ValueError("not a ViT CLIP state dict (no visual.conv1.weight); ResNet towers are not supported")

    def depth(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in sd
                    if k.startswith(prefix) and k.endswith("attn.in_proj_weight")})

    conv = sd["visual.conv1.weight"]
    vision_width, patch = conv.shape[0], conv.shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    return CLIPConfig(
        embed_dim=sd["text_projection"].shape[1], image_encoder="vit", image_size=grid * patch,
        in_channels=conv.shape[1], patch_size=patch, vision_width=vision_width,
        vision_layers=depth("visual.transformer.resblocks."), vision_heads=vision_width // 64,
        tokenizer="clip", vocab_size=sd["token_embedding.weight"].shape[0], real_vocab_size=0,
        context_length=sd["positional_embedding"].shape[0], text_width=text_width,
        text_layers=depth("transformer.resblocks."), text_heads=text_width // 64, text_pool="argmax",
        quick_gelu=quick_gelu,
    )


# keys a released checkpoint carries that are not weights of this model
_IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask", "visual.attn_mask",
                 "pixel_mean", "pixel_std")


def load_openai_state_dict(sd: dict[str, torch.Tensor], quick_gelu: bool = True,
                           **overrides) -> CLIP:
    """Build a CLIP from an OpenAI / open_clip state dict and load it strictly."""
    sd = {k.removeprefix("module."): v for k, v in sd.items() if k.removeprefix("module.") not in _IGNORED_KEYS}
    cfg = config_from_state_dict(sd, quick_gelu)
    known = {f.name for f in fields(CLIPConfig)}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if k in known})
    model = CLIP(cfg)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval()
