"""Text in, images out: sample dVAE ids with the DALL-E transformer, decode them, rerank, save.

    pipe = TextToImage.from_pretrained("default")        # or a dalle run folder / bundle
    out = pipe("a small red circle above a large blue square", num_images_per_prompt=8,
               generator=torch.Generator().manual_seed(0))          # out.images, out.scores
    pipe.save_pretrained("my-bundle")                     # a bundle with a model card (README.md)

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
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from cvformers.config import from_dict, to_dict
from cvformers.errors import UserError
from cvformers.models.dalle import image_inner_vocab_of
from cvformers.models.dalle_sampling import SamplingConfig, sample_codes
from cvformers.images import load_image
from cvformers.loading import DEFAULT_NAME, default_bundle, resolve_run  # noqa: F401  (default_bundle: public here too)
from cvformers.pipelines.pretrained import ImagePipelineOutput, PretrainedPipeline, text_tokenizer_files  # noqa: F401
from cvformers.utils import atomic_write_bytes

MAX_CANDIDATES = 10_000  # images sampled by one generate call (a typo such as --num 10000000 is refused)
CLIP_DIR = "clip"  # optional CLIP run inside a dalle run folder / bundle, used for reranking


def prompt_slug(prompt: str, limit: int = 60) -> str:
    """A file-name-safe form of a prompt: lower case, runs of other characters as one '-'."""
    import re

    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].strip("-")
    return slug or "prompt"


def count_candidates(num_images: int, candidates: int) -> int:
    """The number of images to draw for ``num_images`` kept (``candidates`` 0: as many), checked."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise UserError(f"number of images must be at least 1, got {num_images}")
    candidates = candidates or num_images
    if candidates > MAX_CANDIDATES:
        raise UserError(f"{candidates} images in one call is more than {MAX_CANDIDATES}; split the request")
    if candidates < num_images:
        raise UserError(f"candidates ({candidates}) must be at least the number of images ({num_images})")
    return candidates


class UnknownWords(UserWarning):
    """The prompt holds words the model's caption vocabulary does not: it draws something else."""


class FewDistinctImages(UserWarning):
    """Reranking found fewer distinct candidates than images asked for: the grid is shorter."""


def best_distinct(codes: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` best-scored candidates, best first, skipping any whose image ids equal
    a better one's: at a low temperature the sampler often draws the same image several times,
    and a reranker would otherwise fill the grid with copies of its favourite."""
    seen: set[bytes] = set()
    keep: list[int] = []
    for i in scores.argsort(descending=True).tolist():
        key = codes[i].cpu().numpy().tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(i)
            if len(keep) == k:
                break
    return torch.tensor(keep, dtype=torch.long)


class Reranker(Protocol):
    def score(self, images: torch.Tensor, texts: str | Sequence[str]) -> torch.Tensor: ...


# --- loading a run / the shipped bundle --------------------------------------------------


def _check_files(run: Path) -> None:
    for rel in ("config.toml", "model.safetensors", "tokenizer.json", "vae/config.toml", "vae/model.safetensors"):
        if not (run / rel).is_file():
            raise UserError(f"{run} is not a complete dalle run folder: {rel} is missing")


@dataclass
class Generation:
    """The result of one call: images [N, C, H, W] in [0,1], their ids, and rerank scores (best first)."""

    prompt: str
    images: torch.Tensor
    codes: torch.Tensor | None  # image ids (DALL-E); None for diffusion models
    scores: torch.Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def pil(self) -> list:
        from cvformers.images import to_pil

        return [to_pil(im) for im in self.images]

    def save_images(self, folder: str | Path, min_tile: int = 128) -> list[Path]:
        """One PNG per image, ``folder/0.png`` … best first when reranked (as DALLE-pytorch writes
        them), each with the prompt in its metadata; the scores beside them in ``scores.json``."""
        from cvformers.images import save_image, upscale

        folder = Path(folder)
        tiles = upscale(self.images, min_tile) if min_tile else self.images
        written = []
        for i, tile in enumerate(tiles):
            meta = {"prompt": self.prompt, "cvformers": json.dumps(self.settings, sort_keys=True)}
            if self.scores is not None:
                meta["clip_score"] = f"{float(self.scores[i]):.6f}"
            written.append(save_image(tile, folder / f"{i}.png", metadata=meta))
        if self.scores is not None:
            sidecar = {"prompt": self.prompt, "settings": self.settings,
                       "clip_scores": [round(float(v), 6) for v in self.scores]}
            atomic_write_bytes(folder / "scores.json", json.dumps(sidecar, indent=1).encode())
        return written

    def save_grid(self, path: str | Path, nrow: int | None = None, min_tile: int = 128) -> Path:
        """The images as one picture (one image alone is written as itself, without a frame):
        tiles enlarged by whole pixels until a side is ``min_tile`` (0: as sampled), white gutters
        between them; the format follows the suffix. The prompt and the sampling settings go into
        its metadata."""
        from cvformers.images import picture, save_image

        meta = {"prompt": self.prompt, "cvformers": json.dumps(self.settings, sort_keys=True)}
        scores = None if self.scores is None else [round(float(s), 6) for s in self.scores]
        if scores is not None:  # reranked: the CLIP scores (grid order, best first) in the PNG and beside it
            meta["clip_scores"] = json.dumps(scores)
        written = save_image(picture(self.images, min_tile, nrow), path, metadata=meta)  # first: a refused --out writes nothing
        if scores is not None:
            sidecar = {"prompt": self.prompt, "settings": self.settings, "clip_scores": scores}
            atomic_write_bytes(Path(path).with_suffix(".scores.json"), json.dumps(sidecar, indent=1).encode())
        return written


class TextToImage(PretrainedPipeline):
    """DALL-E transformer + frozen image tokenizer + caption tokenizer (+ optional reranker).

    diffusers' face (``from_pretrained``, ``pipe(prompt) -> .images``, ``to``, ``save_pretrained``)
    comes from ``PretrainedPipeline``; ``load`` / ``generate`` are the same flows by their own names.
    """

    title = "DALL-E text-to-image bundle (cvformers)"

    def __init__(self, model, vae, tokenizer, reranker: Reranker | None = None,
                 sampling: SamplingConfig | None = None, batch_size: int = 16):
        cfg = model.cfg
        if tokenizer.text_len != cfg.text_len or tokenizer.num_text_tokens != cfg.num_text_tokens:
            raise UserError(f"tokenizer (text_len {tokenizer.text_len}, {tokenizer.num_text_tokens} text tokens) "
                            f"does not match the model ({cfg.text_len}, {cfg.num_text_tokens})")
        if vae.num_tokens != cfg.num_image_tokens or vae.grid_size != cfg.grid_size:
            raise UserError(f"image tokenizer ({vae.num_tokens} ids, grid {vae.grid_size}) does not match the "
                            f"model ({cfg.num_image_tokens}, grid {cfg.grid_size})")
        if image_inner_vocab_of(vae) != cfg.image_inner_vocab:
            raise UserError(f"image tokenizer's ids have inner vocabulary {image_inner_vocab_of(vae)} (0: not "
                            f"pairs) but the model was trained with image_inner_vocab = {cfg.image_inner_vocab}")
        self.model, self.vae, self.tokenizer = model.eval(), vae.eval(), tokenizer
        self.reranker = reranker
        self.sampling = sampling or SamplingConfig()  # the model's defaults, from its [sampling] table
        self.batch_size = batch_size
        self.parts_record = {}

    @classmethod
    def load(cls, path_or_name: str | Path = DEFAULT_NAME, device: str | torch.device = "cpu",
             reranker: Reranker | None = None) -> "TextToImage":
        from cvformers.text import BPETokenizer
        from cvformers.loading import load_run

        run = resolve_run(path_or_name)
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
        table = config.get("sampling", {})
        if not isinstance(table, dict):
            raise UserError(f"{run / 'config.toml'}: [sampling] must be a table, got {type(table).__name__}")
        sampling = from_dict(SamplingConfig, table, "sampling")
        pipe = cls(model, vae, tokenizer, reranker=reranker, sampling=sampling)
        pipe.remember_parts({"": run, "vae": run / "vae", CLIP_DIR: run / CLIP_DIR})
        return pipe

    def modules(self) -> dict[str, torch.nn.Module]:
        """The models by their folder in a bundle ("" is the transformer's)."""
        found = {"": self.model, "vae": self.vae}
        clip = getattr(self.reranker, "model", None)
        if clip is not None:
            found[CLIP_DIR] = clip
        return found

    def bundle_parts(self):
        parts = [self.part("", self.model, {"tokenizer.json": self.tokenizer.to_bytes()},
                           {"sampling": to_dict(self.sampling)}),
                 self.part("vae", self.vae)]
        if self.reranker is not None:
            from cvformers.pipelines.rerank import ClipReranker

            if not isinstance(self.reranker, ClipReranker):
                raise UserError(f"the reranker is a {type(self.reranker).__name__}, not a CLIP: it cannot be saved "
                                "into a bundle; set pipe.reranker = None to save the pipeline without it")
            parts.append(self.part(CLIP_DIR, self.reranker.model, text_tokenizer_files(self.reranker.tokenizer)))
        return parts

    def card_limits(self) -> list[str]:
        cfg = self.model.cfg
        known = self.tokenizer.words()
        return [f"Draws {self.image_size}x{self.image_size} images of the kind its training data holds "
                "(see the parts table) and nothing else.",
                f"Reads at most {cfg.text_len} caption tokens; its caption vocabulary holds {len(known)} words, "
                "and a prompt with other words is warned about and draws something else.",
                "Reranking needs the CLIP part: without it, `candidates` must equal the number of images."
                if self.reranker is None else
                "The CLIP part reranks candidates; its scores measure agreement with that CLIP, not with people.",
                "No content filter: it was trained on synthetic scenes, not on photographs or people."]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return self.vae.image_size

    @property
    def reranks(self) -> bool:
        """Whether candidates are reranked (a CLIP is attached)."""
        return self.reranker is not None

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("the prompt is empty")
        text = self.tokenizer.encode(prompt)
        unknown = self.tokenizer.unknown_words(prompt)
        if unknown:
            known = self.tokenizer.words()
            listed = ", ".join(known[:40]) + (" …" if len(known) > 40 else "")
            warnings.warn(f"the model never learnt the word(s) {', '.join(repr(w) for w in unknown)}: "
                          f"expect something else; words it knows: {listed}", UnknownWords, stacklevel=3)
        if bool((text >= self.tokenizer.vocab_size).all()):
            raise UserError(f"the prompt {prompt!r} tokenizes to nothing but padding")
        return text.to(self.device)

    def generate(self, prompt: str, num_images: int = 8, sampling: SamplingConfig | None = None, *,
                 image_prompt: Any = None, prompt_rows: int | None = None, use_cache: bool = True,
                 progress: Callable[[int, int], None] | None = None, generator: torch.Generator | None = None,
                 **settings) -> Generation:
        """Sample ``candidates`` images (default ``num_images``), keep the ``num_images`` best by the reranker.

        ``sampling`` (default: the model's own ``[sampling]`` defaults) says how; keyword
        ``settings`` (``seed=3, guidance=2.0``; ``None`` keeps the value) change single fields.
        ``generator`` draws the randomness in place of one seeded from ``seed`` (diffusers' argument).
        """
        s = (sampling or self.sampling).override(**settings)
        if generator is not None:
            s = replace(s, seed=None)  # the caller's generator decides: no seed to record
        candidates = count_candidates(num_images, s.candidates)
        if candidates > num_images and self.reranker is None:
            raise UserError("more candidates than images needs a reranker (e.g. a CLIP run) to choose them")
        text = self.encode_prompt(prompt)
        G = self.model.cfg.grid_size

        prompt_codes = None
        if image_prompt is not None:
            rows = G // 2 if prompt_rows is None else prompt_rows
            if not 0 <= rows <= G:
                raise UserError(f"prompt rows must be between 0 and {G}, got {rows}")
            image = load_image(image_prompt, self.vae.image_size, self.vae.channels)[None].to(self.device)
            prompt_codes = self.vae.encode(image)[:, :rows].flatten(1)
        elif prompt_rows is not None:
            raise UserError("prompt rows given without an image prompt")

        if generator is None:
            generator = torch.Generator(self.device)
            if s.seed is None:
                generator.seed()
            else:
                generator.manual_seed(s.seed)
        chunks = []
        batches = -(-candidates // self.batch_size)
        for index, start in enumerate(range(0, candidates, self.batch_size)):
            b = min(self.batch_size, candidates - start)
            on_step = None
            if progress is not None:  # the steps of this batch, counted after those of the batches before it
                def on_step(done: int, total: int, before: int = index) -> None:
                    progress(before * total + done, batches * total)
            chunks.append(sample_codes(
                self.model, text.expand(b, -1), s,
                prompt_codes=None if prompt_codes is None else prompt_codes.expand(b, -1),
                generator=generator, use_cache=use_cache, on_step=on_step))
        codes = torch.cat(chunks)
        images = torch.cat([self.vae.decode(c) for c in codes.split(self.batch_size)]).clamp(0, 1)

        scores = None
        if self.reranker is not None:
            scores = torch.as_tensor(self.reranker.score(images, prompt)).flatten().cpu()
            best = best_distinct(codes, scores, num_images) if candidates > num_images else scores.argsort(descending=True)
            if len(best) < num_images:
                warnings.warn(f"only {len(best)} distinct images among {candidates} candidates; raise the "
                              "temperature or the number of candidates for more", FewDistinctImages, stacklevel=2)
            images, codes, scores = images[best.to(images.device)], codes[best.to(codes.device)], scores[best]
        record = {**to_dict(s), "candidates": candidates, "prompt_rows": None if image_prompt is None
                  else (G // 2 if prompt_rows is None else prompt_rows)}
        return Generation(prompt, images.cpu(), codes.cpu(), scores, record)
