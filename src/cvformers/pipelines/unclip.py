"""Text to image with DALL-E 2 (unCLIP, Ramesh et al. 2022, arXiv 2204.06125): caption -> CLIP text
embedding -> diffusion prior -> CLIP image embedding -> diffusion decoder -> 32 px -> upsampler -> 64 px.

    pipe = UnCLIP.load("unclip")                              # the shipped bundle, or a folder of runs
    result = pipe.generate("a red triangle above a blue circle", num_images=8)     # .images, .scores
    variations = pipe.vary("photo.png", num_images=8)        # §3.1: the image's own embedding, new noise
    strip = pipe.interpolate("a.png", "b.png", frames=8)       # §3.2: slerp between two image embeddings
    edits = pipe.text_diff("a.png", "a red circle", "a blue circle", amounts=(0, .25, .5))   # §3.3

The face is the DALL-E pipeline's (``TextToImage``): ``load``, ``generate(prompt, num_images, sampling,
**settings) -> Generation`` with CLIP scores best first when candidates are reranked, and diffusers'
``UnCLIP.from_pretrained("unclip")``, ``pipe(prompts, num_images_per_prompt=4, generator=g).images``,
``to(device)`` and ``save_pretrained(dir)`` (``pipelines/pretrained.py``).

A folder readable by ``UnCLIP.load``::

    DIR/config.toml       kind = "unclip" and optional [sampling] defaults (a bundle), or absent
    DIR/prior/            an unclip-prior run
    DIR/decoder/          an unclip-decoder run
    DIR/upsampler/        optional unclip-upsampler run: without it images stay at the decoder's size
    DIR/clip/             the CLIP both were trained with (else the decoder run's clip/)

A run folder's ``ema.safetensors`` (the weight average the papers sample from) is read in place of
its ``model.safetensors`` when present; ``cvformers bundle --unclip`` writes the average as the weights.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from cvformers.config import ConfigError, from_dict, load_toml, to_dict
from cvformers.diffusion.model import EMA_FILE
from cvformers.diffusion.samplers import DiffusionSamplingConfig
from cvformers.errors import UserError
from cvformers.images import load_image
from cvformers.loading import load_clip, load_run, load_weights, resolve_run
from cvformers.pipelines.pretrained import PretrainedPipeline, text_tokenizer_files
from cvformers.pipelines.rerank import ClipReranker
from cvformers.pipelines.text_to_image import MAX_CANDIDATES, Generation, Reranker, UnknownWords, count_candidates

PRIOR_MODES = ("diffusion", "text")  # UnCLIPSamplingConfig.prior
KINDS = {"prior": ("unclip_prior",), "decoder": ("unclip_decoder", "unclip_latent_decoder"),
         "upsampler": ("unclip_upsampler",)}


@dataclass(frozen=True)
class UnCLIPSamplingConfig:
    """How the three stages are sampled; built and checked once (CLI, TOML ``[sampling]``, Python)."""

    steps: int = 50  # decoder DDIM steps
    guidance: float = 3.0  # decoder classifier-free guidance (1 = off)
    prior_steps: int = 64  # prior DDIM steps (the paper samples its prior with 64)
    prior_guidance: float = 1.0  # prior classifier-free guidance (1 = off)
    prior_candidates: int = 2  # embeddings the prior draws per image, keeping the closest to the text (§2.2)
    # Where the decoder's image embedding comes from: "diffusion", the prior's sample (§2.2); or
    # "text", the caption's CLIP text embedding in its place (no prior: the baseline of §5.1).
    prior: str = "diffusion"
    upsampler_steps: int = 25  # upsampler DDIM steps
    eta: float = 0.0  # DDIM noise of the decoder and the upsampler (0: deterministic given x_T)
    candidates: int = 0  # images drawn and reranked by CLIP, keeping the best (0: as many as asked)
    seed: int | None = 0  # seed of all noise; None = fresh randomness

    def __post_init__(self) -> None:
        for name in ("steps", "prior_steps", "prior_candidates", "upsampler_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"sampling.{name} must be an integer >= 1, got {value!r}")
        if self.prior not in PRIOR_MODES:
            raise ConfigError(f"sampling.prior must be one of {', '.join(PRIOR_MODES)}, got {self.prior!r}")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 0:
            raise ConfigError(f"sampling.candidates must be an integer >= 0, got {self.candidates!r}")
        # the rest is checked where it means the same as for one diffusion model
        self.stage("decoder")
        self.stage("prior")

    def override(self, **settings: Any) -> "UnCLIPSamplingConfig":
        """A copy with the given fields changed; ``None`` keeps a field; an unknown name is refused."""
        known = {f.name for f in fields(self)}
        for key in settings:
            if key not in known:
                raise UserError(f"unknown unCLIP sampling setting {key!r}; known: {', '.join(sorted(known))}")
        return replace(self, **{k: v for k, v in settings.items() if v is not None})

    def stage(self, which: str) -> DiffusionSamplingConfig:
        """The sampling of one stage: ``prior``, ``decoder`` or ``upsampler``."""
        if which == "prior":
            return DiffusionSamplingConfig(steps=self.prior_steps, guidance=self.prior_guidance, clip=False,
                                           seed=self.seed)
        if which == "decoder":
            return DiffusionSamplingConfig(steps=self.steps, guidance=self.guidance, eta=self.eta, seed=self.seed)
        return DiffusionSamplingConfig(steps=self.upsampler_steps, eta=self.eta, seed=self.seed)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between unit-normalised ``a`` and ``b`` (§3.2): t = 0 is a, t = 1 is b."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    if float(omega.min()) < 1e-4:  # (nearly) the same direction: a straight line is the same curve
        return F.normalize((1 - t) * a + t * b, dim=-1)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def is_unclip(path_or_name: str | Path) -> bool:
    """Whether a model name or folder is an unCLIP bundle (or a folder of prior/ and decoder/ runs)."""
    try:
        root = resolve_run(path_or_name)
    except UserError:
        return False
    if (root / "config.toml").is_file():
        try:
            return load_toml(root / "config.toml").get("kind") == "unclip"
        except ConfigError:
            return False
    return (root / "prior").is_dir() and (root / "decoder").is_dir()


def _load_stage(folder: Path, part: str, device):
    if not (folder / "config.toml").is_file() or not (folder / "model.safetensors").is_file():
        raise UserError(f"{folder} is not a complete unCLIP {part} run: config.toml or model.safetensors is missing")
    model, cfg = load_run(folder, device)
    if cfg.get("kind") not in KINDS[part]:
        raise UserError(f"{folder} holds a {cfg.get('kind')!r} model where the {part} "
                        f"({' or '.join(KINDS[part])}) belongs")
    if (folder / EMA_FILE).is_file():
        load_weights(model, folder / EMA_FILE)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _refuse_mixed_clips(root: Path) -> None:
    """A prior and a decoder only fit together in one CLIP's embedding space: runs that carry
    different CLIPs (each run keeps a copy of its own under clip/) are refused before loading."""
    weights = [root / part / "clip" / "model.safetensors" for part in ("prior", "decoder")]
    if all(w.is_file() for w in weights) and weights[0].read_bytes() != weights[1].read_bytes():
        raise UserError(f"{root}: the prior and the decoder were trained with different CLIPs (prior/clip and "
                        "decoder/clip differ); train both with the same --clip")


class UnCLIP(PretrainedPipeline):
    """Prior + decoder (+ upsampler) + the CLIP they share."""

    bundle_layout = "unclip"
    diffusers_settings = {"guidance_scale": "guidance", "num_inference_steps": "steps"}  # the decoder's
    title = "DALL-E 2 (unCLIP) text-to-image bundle (cvformers)"

    def __init__(self, prior, decoder, clip, tokenizer, upsampler=None,
                 sampling: UnCLIPSamplingConfig | None = None, batch_size: int = 32,
                 reranker: Reranker | None = None):
        dim = clip.cfg.embed_dim
        if prior.cfg.clip_dim != dim or decoder.cfg.clip_dim != dim:
            raise UserError(f"the CLIP's embeddings are {dim} wide but the prior reads {prior.cfg.clip_dim} and "
                            f"the decoder {decoder.cfg.clip_dim}: they were trained with another CLIP")
        if prior.cfg.text_len != clip.cfg.context_length:
            raise UserError(f"the prior reads {prior.cfg.text_len} caption tokens, the CLIP {clip.cfg.context_length}")
        if upsampler is not None and upsampler.cfg.low_res != decoder.image_size:
            raise UserError(f"the upsampler enlarges {upsampler.cfg.low_res}-px images but the decoder draws "
                            f"{decoder.image_size} px")
        self.prior, self.decoder, self.clip, self.tokenizer = prior, decoder, clip.eval(), tokenizer
        self.upsampler = upsampler
        # Scores the candidates (a bundle's reranker/ or a ``ClipReranker`` of another CLIP run);
        # None: the CLIP the prior and decoder share.
        self.reranker = reranker
        self.sampling = sampling or UnCLIPSamplingConfig()
        self.batch_size = batch_size
        self.parts_record = {}

    @classmethod
    def load(cls, path_or_name: str | Path = "unclip", device: str | torch.device = "cpu",
             reranker: Reranker | None = None) -> "UnCLIP":
        root = resolve_run(path_or_name)
        table: dict = {}
        if (root / "config.toml").is_file():
            config = load_toml(root / "config.toml")
            if config.get("kind") != "unclip":
                raise UserError(f"{root} holds a {config.get('kind')!r} model, not an unclip bundle")
            table = config.get("sampling", {})
            if not isinstance(table, dict):
                raise UserError(f"{root / 'config.toml'}: [sampling] must be a table")
        for part in ("prior", "decoder"):
            if not (root / part).is_dir():
                raise UserError(f"{root} is not an unCLIP model: the {part}/ folder is missing")
        _refuse_mixed_clips(root)
        prior = _load_stage(root / "prior", "prior", device)
        decoder = _load_stage(root / "decoder", "decoder", device)
        upsampler = _load_stage(root / "upsampler", "upsampler", device) if (root / "upsampler").is_dir() else None
        clip_dir = root / "clip" if (root / "clip").is_dir() else root / "decoder" / "clip"
        if not (clip_dir / "config.toml").is_file():
            raise UserError(f"{root}: no CLIP found (neither clip/ nor decoder/clip/)")
        clip, tokenizer = load_clip(clip_dir, device=device)
        if reranker is None and (root / "reranker").is_dir():  # the bundle's own reranker, unless one is given
            reranker = ClipReranker.load(root / "reranker", device=device)
        pipe = cls(prior, decoder, clip, tokenizer, upsampler,
                   sampling=from_dict(UnCLIPSamplingConfig, table, "sampling"), reranker=reranker)
        pipe.remember_parts({"prior": root / "prior", "decoder": root / "decoder", "upsampler": root / "upsampler",
                             "clip": clip_dir, "reranker": root / "reranker"})
        return pipe

    def modules(self) -> dict[str, torch.nn.Module]:
        """The models by their folder in a bundle."""
        found = {"prior": self.prior, "decoder": self.decoder, "clip": self.clip}
        if self.upsampler is not None:
            found["upsampler"] = self.upsampler
        if isinstance(self.reranker, ClipReranker):  # another scorer has no weights to move or bundle
            found["reranker"] = self.reranker.model
        return found

    def bundle_parts(self):
        from cvformers.config import dumps_toml
        from cvformers.pipelines.bundle import BundlePart

        root = {"kind": "unclip", "sampling": to_dict(self.sampling)}
        parts = [BundlePart("", None, {"config.toml": dumps_toml(root).encode()})]
        tokenizers = {"clip": self.tokenizer}
        if isinstance(self.reranker, ClipReranker):
            tokenizers["reranker"] = self.reranker.tokenizer
        parts += [self.part(rel, module, text_tokenizer_files(tokenizers[rel]) if rel in tokenizers else None)
                  for rel, module in self.modules().items()]
        return parts

    def card_limits(self) -> list[str]:
        size = self.decoder.image_size
        return [f"Draws {self.image_size}x{self.image_size} images" +
                (f" (the decoder draws {size} px, the upsampler enlarges them)" if self.upsampler else "") +
                " of the kind its training data holds (see the parts table) and nothing else.",
                f"Reads at most {self.clip.cfg.context_length} caption tokens with its CLIP's tokenizer; "
                "a prompt with words that tokenizer never learnt is warned about and draws something else.",
                "Diffusion sampling runs every step of the decoder, prior and upsampler: far slower than "
                "DALL-E's sampler on a CPU.",
                "No content filter: it was trained on synthetic scenes, not on photographs or people."]

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @property
    def image_size(self) -> int:
        return self.upsampler.cfg.unet.image_size if self.upsampler is not None else self.decoder.image_size

    @property
    def reranks(self) -> bool:
        """Candidates are always reranked: by ``reranker`` when set, else by the CLIP the prior and
        decoder share."""
        return True

    # --- embeddings -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(caption ids [1, L], unit CLIP text embedding [1, D]) of a prompt."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("the prompt is empty")
        unknown = self.tokenizer.unknown_words(prompt) if hasattr(self.tokenizer, "unknown_words") else []
        if unknown:
            warnings.warn(f"the model never learnt the word(s) {', '.join(repr(w) for w in unknown)}: "
                          "expect something else", UnknownWords, stacklevel=3)
        text = self.tokenizer.encode([prompt]).to(self.device)
        return text, self.clip.encode_text(text, normalize=True)

    @torch.no_grad()
    def encode_images(self, images: Any) -> torch.Tensor:
        """Unit CLIP image embeddings [N, D] of image files, PIL images or a tensor [N, C, H, W] in [0, 1]."""
        from cvformers.images import fit_images

        if isinstance(images, torch.Tensor) and images.dim() == 3:
            images = images[None]
        if not isinstance(images, torch.Tensor):
            images = torch.stack([load_image(im, self.clip.cfg.image_size, self.clip.cfg.in_channels)
                                  for im in (images if isinstance(images, (list, tuple)) else [images])])
        images = fit_images(images.float(), self.clip.cfg.image_size)
        return self.clip.encode_image(images.to(self.device), normalize=True)

    # --- drawing ----------------------------------------------------------------------------
    def _generator(self, s: UnCLIPSamplingConfig) -> torch.Generator:
        generator = torch.Generator(self.device)
        generator.seed() if s.seed is None else generator.manual_seed(s.seed)
        return generator

    @torch.no_grad()
    def decode(self, embeddings: torch.Tensor, text: torch.Tensor | None = None,
               sampling: UnCLIPSamplingConfig | None = None, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images [N, C, S, S] in [0, 1] from CLIP image embeddings [N, D] (+ captions [N, L]):
        the decoder, then the upsampler when there is one."""
        s = sampling or self.sampling
        generator = generator or self._generator(s)
        out = []
        for start in range(0, len(embeddings), self.batch_size):
            part = slice(start, start + self.batch_size)
            images = self.decoder.sample(embeddings[part], None if text is None else text[part], s.stage("decoder"),
                                         generator=generator, noise=None if noise is None else noise[part])
            if self.upsampler is not None:
                images = self.upsampler.sample(images, s.stage("upsampler"), generator=generator)
            out.append(images.cpu())
        return torch.cat(out)

    def generate(self, prompt: str, num_images: int = 8, sampling: UnCLIPSamplingConfig | None = None,
                 generator: torch.Generator | None = None, **settings) -> Generation:
        """Draw ``candidates`` images (default ``num_images``) for a prompt, keep the ``num_images`` CLIP
        scores best (best first). ``settings`` change single fields of ``sampling`` (``seed=3``);
        ``generator`` draws all noise in place of one seeded from ``seed`` (diffusers' argument)."""
        s = (sampling or self.sampling).override(**settings)
        if generator is not None:
            s = replace(s, seed=None)  # the caller's generator decides: no seed to record
        candidates = count_candidates(num_images, s.candidates)
        text, text_embedding = self.encode_prompt(prompt)
        generator = generator or self._generator(s)
        if s.prior == "text":
            embeddings = text_embedding.expand(candidates, -1)
        else:
            embeddings = self.prior.sample(text.expand(candidates, -1), text_embedding.expand(candidates, -1),
                                           s.stage("prior"), candidates=s.prior_candidates, generator=generator)
        images = self.decode(embeddings, text.expand(candidates, -1), s, generator)
        if self.reranker is not None:
            scores = self.reranker.score(images, prompt).cpu()
        else:
            scores = (self.encode_images(images) @ text_embedding[0]).cpu()
        best = scores.argsort(descending=True)[:num_images]
        return Generation(prompt, images[best], None, scores[best], {**to_dict(s), "model": "unclip"})

    def vary(self, image: Any, num_images: int = 8, sampling: UnCLIPSamplingConfig | None = None,
             **settings) -> Generation:
        """Variations of an image (§3.1): its CLIP image embedding decoded from fresh noise, no caption."""
        s = (sampling or self.sampling).override(**settings)
        if isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= MAX_CANDIDATES:
            raise UserError(f"number of images must be between 1 and {MAX_CANDIDATES}, got {num_images}")
        embedding = self.encode_images(image)[:1]
        images = self.decode(embedding.expand(num_images, -1), None, s)
        scores = (self.encode_images(images) @ embedding[0]).cpu()  # similarity to the source, as a check
        return Generation("variations", images, None, scores, {**to_dict(s), "model": "unclip", "mode": "vary"})

    def _fixed_noise(self, n: int, s: UnCLIPSamplingConfig) -> torch.Tensor:
        """One x_T shared by every row, so that only the embedding changes along a strip (§3.2)."""
        shape = self.decoder.image_shape
        one = torch.randn((1, *shape), generator=self._generator(s), device=self.device)
        return one.expand(n, *shape)

    def interpolate(self, a: Any, b: Any, frames: int = 8, sampling: UnCLIPSamplingConfig | None = None,
                    **settings) -> torch.Tensor:
        """Images [frames, C, S, S] along the slerp from image ``a``'s CLIP embedding to ``b``'s (§3.2),
        all decoded from the same x_T."""
        s = (sampling or self.sampling).override(**settings)
        if isinstance(frames, bool) or not isinstance(frames, int) or not 2 <= frames <= 64:
            raise UserError(f"the number of interpolation frames must be between 2 and 64, got {frames}")
        za, zb = self.encode_images([a, b]).split(1)
        path = torch.cat([slerp(za, zb, i / (frames - 1)) for i in range(frames)])
        return self.decode(path, None, s, noise=self._fixed_noise(frames, s))

    def text_diff(self, image: Any, caption: str, target: str, amounts: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
                  sampling: UnCLIPSamplingConfig | None = None, **settings) -> torch.Tensor:
        """Images [len(amounts), C, S, S]: ``image``'s embedding rotated toward the text diff
        z_d = norm(z_t(target) - z_t(caption)) by slerp with each amount θ (§3.3), same x_T."""
        s = (sampling or self.sampling).override(**settings)
        amounts = [float(a) for a in amounts]
        if not amounts or any(not math.isfinite(a) or not 0 <= a <= 1 for a in amounts):
            raise UserError(f"amounts must be numbers in [0, 1], got {amounts}")
        z_image = self.encode_images(image)[:1]
        _, z_from = self.encode_prompt(caption)
        _, z_to = self.encode_prompt(target)
        diff = F.normalize(z_to - z_from, dim=-1)
        if float((z_to - z_from).norm()) < 1e-6:
            raise UserError("the two captions have the same CLIP embedding: nothing to move toward")
        path = torch.cat([slerp(z_image, diff, a) for a in amounts])
        return self.decode(path, None, s, noise=self._fixed_noise(len(amounts), s))


__all__ = ["UnCLIP", "UnCLIPSamplingConfig", "is_unclip", "slerp"]
