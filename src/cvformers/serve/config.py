"""What the web page serves and the limits it holds every request to: one ``ServeConfig``.

Nothing here imports Gradio, so the settings, the input checks and the handlers can be used and
tested without the ``ui`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass

from cvformers.errors import UserError
from cvformers.loading import DEFAULT_NAME, UNCLIP_NAME

# The generators the text-to-image tab loads, by the ``kind`` in a run's config.toml: the module
# and class of a pipeline with ``load(path)`` and ``generate(prompt, num_images=..., candidates=...,
# seed=..., progress=..., **sampling) -> Generation`` (``.images``, ``.scores``, ``.save_grid``).
# A new generator is one more line here (imported only when a run of that kind is served).
GENERATOR_KINDS: dict[str, tuple[str, str]] = {
    "dalle": ("cvformers.pipelines.text_to_image", "TextToImage"),
    "unclip": ("cvformers.pipelines.unclip", "UnCLIP"),
}

# Generators that ship inside the package: the model menu of a plain `cvformers serve`.
SHIPPED_GENERATORS: tuple[str, ...] = (DEFAULT_NAME, UNCLIP_NAME)

# Example prompts in the shipped model's words (its captions are the `shapes` data's). The last
# three use colour–shape pairs that never occur in its training captions (``HELDOUT_PAIRS``).
EXAMPLE_PROMPTS: tuple[str, ...] = (
    "a small red circle above a large blue square",
    "a yellow triangle left of a green square",
    "a large purple plus",
    "a small white square below a cyan circle",
    "a red triangle above a blue square",
    "a large green plus right of a small white circle",
    "a yellow square below a blue circle",
)

UPLOAD_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # image files the page accepts


@dataclass(frozen=True)
class ServeConfig:
    """The web page's models, address and limits; checked once when built."""

    models: tuple[str, ...] = SHIPPED_GENERATORS  # text-to-image generators (shipped names, run folders); first preselected
    clip: str = f"{DEFAULT_NAME}/clip"  # CLIP run or weight file of the zero-shot tab
    classifiers: tuple[str, ...] = ("vit_nano_patch4_28",)  # attention tab's classifier runs (a preset: random weights)
    host: str = "127.0.0.1"  # address to listen on; 0.0.0.0 opens the page to the network
    port: int = 7860  # TCP port to listen on
    concurrency: int = 1  # requests computed at once over all tabs; each already uses every core through torch
    queue_size: int = 32  # requests that may wait for their turn; more are turned away with a message
    max_prompt_chars: int = 200  # longest prompt accepted (the shipped model reads 32 caption tokens)
    max_images: int = 16  # images per request
    max_candidates: int = 128  # candidates sampled per request for CLIP to choose from
    max_uploads: int = 8  # images per zero-shot request
    max_labels: int = 32  # labels per zero-shot request
    max_upload_mb: float = 5.0  # size of one uploaded file
    max_image_side: int = 4096  # pixels along either side of an uploaded image
    tile_size: int = 128  # generated images are enlarged by whole pixels to this side, on the page and in the grid
    keep_outputs_minutes: float = 60.0  # grid PNGs offered for download are deleted after this long
    examples: tuple[str, ...] = EXAMPLE_PROMPTS  # example prompts under the text-to-image form

    def __post_init__(self) -> None:
        if not self.models:
            raise UserError("give at least one model for the text-to-image tab")
        if not self.classifiers:
            raise UserError("give at least one classifier run for the attention tab")
        if not 1 <= self.port <= 65535:
            raise UserError(f"port must be in 1..65535, got {self.port}")
        for name in ("concurrency", "queue_size", "max_prompt_chars", "max_images", "max_candidates",
                     "max_uploads", "max_labels", "max_image_side", "tile_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if not self.max_upload_mb > 0 or not self.keep_outputs_minutes > 0:
            raise UserError("max_upload_mb and keep_outputs_minutes must be positive")
        if self.max_candidates < self.max_images:
            raise UserError(f"max_candidates ({self.max_candidates}) must be at least max_images ({self.max_images})")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
