"""Text in, images out: sample dVAE ids with the DALL-E transformer, decode them, rerank, save.

    pipe = TextToImage.load("default")                  # or a dalle run folder
    images = pipe("a small red circle above a large blue square", num_images=8, seed=0)

Sampling (DALL-E §2.3 / §3) draws the image ids one at a time. Each step is one forward of a
single token against a key/value cache (``DALLE.prefill`` runs the text prefix once per batch,
``DALLE.decode_step`` then reads only the slots its attention pattern allows), so a step costs
the same at the first image id as at the last. Beyond the paper: temperature / top-k / top-p,
classifier-free guidance (conditional and unconditional rows in ONE batched forward, logits
mixed by a scale), and reranking of candidates with a scorer such as CLIP.

A dalle run folder readable by ``TextToImage.load``::

    RUN/config.toml          kind = "dalle", [model] (DalleConfig), optional [sampling] defaults
    RUN/model.safetensors    transformer weights
    RUN/tokenizer.json       the BPE caption tokenizer (cvformers.text.BPETokenizer)
    RUN/vae/config.toml      the frozen image tokenizer's run (kind = "dvae" or "vqvae")
    RUN/vae/model.safetensors
    RUN/clip/                optional CLIP run (config.toml, model.safetensors, tokenizer.json):
                             when present, candidates are reranked with it

``cvformers train dalle`` writes exactly this; "default" is the bundle shipped in
``cvformers/assets/default/`` with the same layout.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from cvformers.errors import UserError
from cvformers.models.dalle import tokenizer_inner_vocab
from cvformers.utils import atomic_write_bytes

DEFAULT_NAME = "default"
CLIP_DIR = "clip"  # optional CLIP run inside a dalle run folder / bundle, used for reranking
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "guidance")


class Reranker(Protocol):
    def score(self, images: torch.Tensor, texts: str | Sequence[str]) -> torch.Tensor: ...


# --- the sampling loop ------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Keep the k most likely ids and/or the smallest set whose probability reaches p; -inf elsewhere."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        # the k-th largest is the (V-k+1)-th smallest: kthvalue is ~4x faster than topk on CPU
        kth = logits.kthvalue(logits.shape[-1] - top_k + 1, dim=-1, keepdim=True).values
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop an id when the ids before it already reach p (the most likely id always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def gumbel_noise(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """-log(-log U) for U uniform: argmax(logits + noise) is an exact draw from softmax(logits)."""
    uniform = torch.rand(shape, generator=generator, device=device).clamp_(min=1e-20)
    return uniform.log_().neg_().log_().neg_()


def sample_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, generator: torch.Generator | None = None,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
    """[B, V] logits -> [B] ids. temperature 0 is greedy. ``noise``: this draw's ``gumbel_noise``
    [B, V] made ahead (the same numbers the generator would give here), else drawn now."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logits = filter_logits(logits, top_k, top_p)
    # Gumbel-max: argmax(logits + Gumbel noise) is an exact draw from softmax(logits), and costs a
    # third of torch.multinomial per decode step on CPU; filtered ids stay at -inf
    if noise is None:
        noise = gumbel_noise(logits.shape, generator, logits.device)
    return (logits + noise).argmax(-1)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: cond + (s - 1)(cond - uncond); s = 1 is exactly the conditional logits."""
    return cond + (scale - 1.0) * (cond - uncond)


def sample_codes(model, text: torch.Tensor, *, prompt_codes: torch.Tensor | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 guidance: float = 1.0, generator: torch.Generator | None = None,
                 use_cache: bool = True, packed: bool = True) -> torch.Tensor:
    """Sample the image ids of a DALLE for text ids [B, T] -> LongTensor[B, grid, grid].

    ``prompt_codes`` [B, r·grid] fixes the first r rows (image prompt, §3.3). ``guidance`` != 1
    appends the unconditional (all-pad) rows to the batch, so both run in one forward per step.
    ``use_cache=False`` recomputes the whole prefix every step (the slow baseline, for benchmarks);
    ``packed=False`` keeps the decode step's products on ``F.linear`` instead of oneDNN's packed
    weights (``cvformers.nn.decode_linear``; the same ids up to float rounding, for A/B timing).
    """
    # inference mode skips autograd's bookkeeping (version counters, views' metadata) on every op,
    # which shows in a loop of ~80 small ops per token
    with torch.inference_mode():
        codes = _sample_codes(model, text, prompt_codes, temperature, top_k, top_p, guidance, generator, use_cache,
                              packed)
    return codes.clone()  # a normal tensor again: callers may edit it or feed it to autograd


def _sample_codes(model, text, prompt_codes, temperature, top_k, top_p, guidance, generator, use_cache, packed):
    cfg = model.cfg
    B, T, n, G = text.shape[0], cfg.text_len, cfg.grid_size**2, cfg.grid_size
    guided = guidance != 1.0
    if guided:
        text = torch.cat([text, model.unconditional_text(B)])

    def both(c: torch.Tensor) -> torch.Tensor:  # the same ids go to the conditional and unconditional rows
        return torch.cat([c, c]) if guided else c

    # The Gumbel noise of a whole grid row's steps is drawn at once: the generator gives the same
    # numbers in the same order as one draw per step, with a fifth of the small ops per step.
    V, noise = cfg.num_image_tokens, None

    def pick(logits: torch.Tensor, i: int) -> torch.Tensor:
        nonlocal noise
        if guided:
            logits = guided_logits(*logits.chunk(2), guidance)
        if temperature == 0:
            return logits.argmax(-1)
        if (i - start) % G == 0:
            noise = gumbel_noise((min(G, n - i), B, V), generator, logits.device)
        return sample_from_logits(logits, temperature, top_k, top_p, noise=noise[(i - start) % G])

    codes = torch.zeros(B, n, dtype=torch.long, device=text.device)
    start = 0
    if prompt_codes is not None:
        start = prompt_codes.shape[1]
        codes[:, :start] = prompt_codes
    if start >= n:
        return codes.view(B, G, G)
    if use_cache:
        caches = model.new_caches(text.shape[0], packed=packed)
        logits = model.prefill(text, caches, both(codes[:, :start]) if start else None)
        for i in range(start, n):
            codes[:, i] = pick(logits, i)
            if i + 1 < n:
                logits = model.decode_step(both(codes[:, i]), T + i, caches)
    else:
        for i in range(start, n):
            h = model(text, both(codes[:, :i]) if i else None)
            codes[:, i] = pick(model.image_head(h[:, -1]), i)
    return codes.view(B, G, G)


# --- loading a run / the shipped bundle --------------------------------------------------


def default_bundle() -> Path:
    from importlib.resources import files

    return Path(str(files("cvformers") / "assets" / DEFAULT_NAME))


def resolve_model_path(path_or_name: str | Path) -> Path:
    if str(path_or_name) == DEFAULT_NAME:
        path = default_bundle()
        if not (path / "config.toml").is_file():
            raise UserError(f"the default model is not installed (expected it in {path})")
        return path
    path = Path(path_or_name)
    if not path.exists():
        raise UserError(f"unknown model {str(path_or_name)!r}: not {DEFAULT_NAME!r} and no such folder")
    if not path.is_dir():
        raise UserError(f"model {path} is not a folder (give a dalle run folder or {DEFAULT_NAME!r})")
    return path


def _check_files(run: Path) -> None:
    for rel in ("config.toml", "model.safetensors", "tokenizer.json", "vae/config.toml", "vae/model.safetensors"):
        if not (run / rel).is_file():
            raise UserError(f"{run} is not a complete dalle run folder: {rel} is missing")


def load_image(image: Any, size: int, channels: int) -> torch.Tensor:
    """A path, PIL image or [C,H,W] tensor in [0,1] -> [1, channels, size, size] (centre crop, resize)."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        x = image.float()[None] if image.dim() == 3 else image.float()
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False).clamp(0, 1)
        return x[:, :channels] if x.shape[1] >= channels else x.expand(-1, channels, -1, -1)
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise UserError(f"image prompt not found: {image}")
        try:
            image = Image.open(image)
            image.load()
        except Exception as e:
            raise UserError(f"cannot read image prompt {image}: {e}") from None
    img = image.convert("RGB" if channels == 3 else "L")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, channels)
    return (x.permute(2, 0, 1).float() / 255.0)[None]


@dataclass
class Generation:
    """The result of one call: images [N, C, H, W] in [0,1], their ids, and rerank scores (best first)."""

    prompt: str
    images: torch.Tensor
    codes: torch.Tensor
    scores: torch.Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def pil(self) -> list:
        from cvformers.utils import to_pil

        return [to_pil(im) for im in self.images]

    def save_grid(self, path: str | Path, nrow: int | None = None) -> Path:
        """One PNG grid; the prompt and the sampling settings go into its text metadata."""
        from cvformers.utils import image_grid, save_png

        n = len(self.images)
        nrow = nrow or (min(n, 4) if n <= 16 else math.ceil(math.sqrt(n)))
        meta = {"prompt": self.prompt, "cvformers": json.dumps(self.settings, sort_keys=True)}
        if self.scores is not None:
            # Reranked: the CLIP scores (grid order, best first) go into the PNG and beside it as JSON.
            scores = [round(float(s), 6) for s in self.scores]
            meta["clip_scores"] = json.dumps(scores)
            sidecar = {"prompt": self.prompt, "settings": self.settings, "clip_scores": scores}
            atomic_write_bytes(Path(path).with_suffix(".scores.json"), json.dumps(sidecar, indent=1).encode())
        return save_png(image_grid(self.images, nrow=nrow), path, metadata=meta)


class TextToImage:
    """DALL-E transformer + frozen image tokenizer + caption tokenizer (+ optional reranker)."""

    def __init__(self, model, vae, tokenizer, reranker: Reranker | None = None,
                 defaults: dict[str, Any] | None = None, batch_size: int = 16):
        cfg = model.cfg
        if tokenizer.text_len != cfg.text_len or tokenizer.num_text_tokens != cfg.num_text_tokens:
            raise UserError(f"tokenizer (text_len {tokenizer.text_len}, {tokenizer.num_text_tokens} text tokens) "
                            f"does not match the model ({cfg.text_len}, {cfg.num_text_tokens})")
        if vae.num_tokens != cfg.num_image_tokens or vae.grid_size != cfg.grid_size:
            raise UserError(f"image tokenizer ({vae.num_tokens} ids, grid {vae.grid_size}) does not match the "
                            f"model ({cfg.num_image_tokens}, grid {cfg.grid_size})")
        if tokenizer_inner_vocab(vae) != cfg.image_inner_vocab:
            raise UserError(f"image tokenizer's ids have inner vocabulary {tokenizer_inner_vocab(vae)} (0: not "
                            f"pairs) but the model was trained with image_inner_vocab = {cfg.image_inner_vocab}")
        self.model, self.vae, self.tokenizer = model.eval(), vae.eval(), tokenizer
        self.reranker = reranker
        self.defaults = {"temperature": 1.0, "top_k": None, "top_p": None, "guidance": 1.0, **(defaults or {})}
        # a run's [sampling] table writes "off" as top_k = 0 and top_p = 1 (TOML has no null)
        self.defaults["top_k"] = self.defaults["top_k"] or None
        if self.defaults["top_p"] is not None and self.defaults["top_p"] >= 1:
            self.defaults["top_p"] = None
        self.batch_size = batch_size

    @classmethod
    def load(cls, path_or_name: str | Path = DEFAULT_NAME, device: str | torch.device = "cpu",
             reranker: Reranker | None = None) -> "TextToImage":
        from cvformers.text import BPETokenizer
        from cvformers.train.checkpoint import load_run

        run = resolve_model_path(path_or_name)
        _check_files(run)
        model, config = load_run(run, device)
        if config.get("kind") != "dalle":
            raise UserError(f"{run} holds a {config.get('kind')!r} model, not a dalle")
        vae, _ = load_run(run / "vae", device)
        tokenizer = BPETokenizer.load(run / "tokenizer.json")
        if reranker is None and (run / CLIP_DIR / "config.toml").is_file():
            # A bundle may carry its own CLIP (the shipped default does): rerank with it.
            from cvformers.pipelines.rerank import ClipReranker

            reranker = ClipReranker.load(run / CLIP_DIR, device=device)
        defaults = {k: v for k, v in config.get("sampling", {}).items() if k in SAMPLING_KEYS}
        return cls(model, vae, tokenizer, reranker=reranker, defaults=defaults)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("the prompt is empty")
        text = self.tokenizer.encode(prompt)
        if bool((text >= self.tokenizer.vocab_size).all()):
            raise UserError(f"the prompt {prompt!r} tokenizes to nothing but padding")
        return text.to(self.device)

    def generate(self, prompt: str, num_images: int = 8, seed: int | None = 0, candidates: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 guidance: float | None = None, image_prompt: Any = None, prompt_rows: int | None = None,
                 use_cache: bool = True) -> Generation:
        """Sample ``candidates`` images (default ``num_images``), keep the ``num_images`` best by the reranker."""
        s = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "guidance": guidance}
        s = {k: (self.defaults[k] if v is None else v) for k, v in s.items()}
        candidates = num_images if candidates is None else candidates
        if not isinstance(num_images, int) or num_images < 1:
            raise UserError(f"number of images must be at least 1, got {num_images}")
        if candidates < num_images:
            raise UserError(f"candidates ({candidates}) must be at least the number of images ({num_images})")
        if candidates > num_images and self.reranker is None:
            raise UserError("more candidates than images needs a reranker (e.g. a CLIP run) to choose them")
        if s["temperature"] < 0:
            raise UserError(f"temperature must be >= 0, got {s['temperature']}")
        if s["top_p"] is not None and not 0 < s["top_p"] <= 1:
            raise UserError(f"top_p must be in (0, 1], got {s['top_p']}")
        if s["top_k"] is not None and s["top_k"] < 1:
            raise UserError(f"top_k must be >= 1, got {s['top_k']}")
        text = self.encode_prompt(prompt)
        G = self.model.cfg.grid_size

        prompt_codes = None
        if image_prompt is not None:
            rows = G // 2 if prompt_rows is None else prompt_rows
            if not 0 <= rows <= G:
                raise UserError(f"prompt rows must be between 0 and {G}, got {rows}")
            image = load_image(image_prompt, self.vae.image_size, self.vae.channels).to(self.device)
            prompt_codes = self.vae.encode(image)[:, :rows].flatten(1)
        elif prompt_rows is not None:
            raise UserError("prompt rows given without an image prompt")

        generator = torch.Generator(self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        chunks = []
        for start in range(0, candidates, self.batch_size):
            b = min(self.batch_size, candidates - start)
            chunks.append(sample_codes(
                self.model, text.expand(b, -1),
                prompt_codes=None if prompt_codes is None else prompt_codes.expand(b, -1),
                generator=generator, use_cache=use_cache, **s))
        codes = torch.cat(chunks)
        images = torch.cat([self.vae.decode(c) for c in codes.split(self.batch_size)]).clamp(0, 1)

        scores = None
        if self.reranker is not None:
            scores = torch.as_tensor(self.reranker.score(images, prompt)).flatten().cpu()
            best = scores.topk(num_images).indices  # best first
            images, codes, scores = images[best.to(images.device)], codes[best.to(codes.device)], scores[best]
        settings = {**s, "seed": seed, "candidates": candidates, "prompt_rows": None if image_prompt is None
                    else (G // 2 if prompt_rows is None else prompt_rows)}
        return Generation(prompt, images.cpu(), codes.cpu(), scores, settings)

    def __call__(self, prompt: str, num_images: int = 8, seed: int | None = 0, candidates: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 guidance: float | None = None, image_prompt: Any = None, prompt_rows: int | None = None,
                 return_scores: bool = False):
        """-> list of PIL images (and the rerank scores, best first, when ``return_scores``)."""
        out = self.generate(prompt, num_images, seed, candidates, temperature, top_k, top_p, guidance,
                            image_prompt, prompt_rows)
        return (out.pil(), out.scores) if return_scores else out.pil()


def generate_grid(prompt: str, out: str | Path, model: str | Path = DEFAULT_NAME, num_images: int = 8,
                  clip: str | Path | None = None, device: str = "cpu", **kwargs) -> Generation:
    """Load, sample and save one PNG grid (what ``cvformers generate`` does)."""
    reranker = None
    if clip is not None:
        from cvformers.pipelines.rerank import ClipReranker

        reranker = ClipReranker.load(clip, device=device)
    pipe = TextToImage.load(model, device=device, reranker=reranker)
    result = pipe.generate(prompt, num_images=num_images, **kwargs)
    result.save_grid(out)
    return result
