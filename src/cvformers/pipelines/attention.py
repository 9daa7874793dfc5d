"""Seeing inside the vision models: attention maps, attention rollout, token-mixing weights.

For a ViT and one image:
- per layer and per head, where the class token and a chosen query patch look, as heat maps
  over the image;
- the whole N×N patch-to-patch attention matrix of every layer as an image (the lecture's
  144×144 picture for 12×12 patches);
- attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", §3):
  each layer's head-averaged attention A gets the residual connection added, Ã = ½A + ½I,
  rows renormalised, and the layers multiplied, R = Ã_L ⋯ Ã_1; row 0 of R (class token) says
  how much each patch flowed into the prediction.
For an MLP-Mixer: the first-layer weights of chosen hidden units of the token-mixing MLPs,
each one an image over the patch grid (Tolstikhin et al., "Visualization").

The maps come from the model's explicit attention path (``return_attention=True``), so they
are available while the normal forward pass uses fused SDPA.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from cvformers.errors import UserError
from cvformers.images import load_image
from cvformers.utils import atomic_write_bytes

PANEL = 96  # pixel side of one panel in the figures


# --- the numbers ------------------------------------------------------------------------


@torch.no_grad()
def vit_attention(vit, image: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer attention [heads, 1 + N, 1 + N] of a ``VisionTransformer`` for one image
    [C, H, W] (already normalised the way the model expects)."""
    was_training = vit.training
    vit.eval()
    try:
        maps = vit.attention_maps(image[None])
    finally:
        vit.train(was_training)
    return [m[0] for m in maps]


def attention_rollout(maps: list[torch.Tensor], residual: bool = True) -> torch.Tensor:
    """Attention rollout over layers (Abnar & Zuidema §3): [T, T], every row sums to 1.

    ``maps``: per layer [heads, T, T] (row = query, softmax over keys). Heads are averaged;
    ``residual`` adds the identity for the skip connection before renormalising rows.
    """
    if not maps:
        raise ValueError("attention_rollout needs at least one layer")
    t = maps[0].shape[-1]
    eye = torch.eye(t, dtype=maps[0].dtype, device=maps[0].device)
    rollout = eye
    for layer in maps:
        a = layer.mean(dim=0)
        if residual:
            a = 0.5 * a + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout
    return rollout


def patch_attention(maps: list[torch.Tensor], query: int, grid: tuple[int, int]) -> torch.Tensor:
    """Where token ``query`` (0 = class token, 1 + r·gw + c = patch (r, c)) looks, among the
    patches: [layers, heads, gh, gw]."""
    stacked = torch.stack([m[:, query, 1:] for m in maps])
    return stacked.reshape(stacked.shape[0], stacked.shape[1], *grid)


# --- drawing ----------------------------------------------------------------------------

# anchor colours of a perceptually ordered dark-to-bright map (black, purple, red, orange, yellow)
_HEAT = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]]) / 255.0
# a diverging map for signed weights: blue, white, red
_SIGNED = torch.tensor([[33, 102, 172], [247, 247, 247], [178, 24, 43]]) / 255.0


def colormap(values: torch.Tensor, anchors: torch.Tensor = _HEAT) -> torch.Tensor:
    """[H, W] in [0, 1] -> [3, H, W] by piecewise-linear interpolation between anchor colours."""
    x = values.clamp(0, 1) * (len(anchors) - 1)
    lo = x.floor().long().clamp(max=len(anchors) - 2)
    frac = (x - lo).unsqueeze(-1)
    rgb = anchors[lo] * (1 - frac) + anchors[lo + 1] * frac
    return rgb.permute(2, 0, 1)


def normalise(heat: torch.Tensor) -> torch.Tensor:
    lo, hi = heat.min(), heat.max()
    return (heat - lo) / (hi - lo) if hi > lo else torch.zeros_like(heat)


def overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """Heat map [gh, gw] (any scale) upsampled over image [C, H, W] in [0, 1] -> [3, H, W]."""
    rgb = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
    h, w = rgb.shape[-2:]
    up = F.interpolate(heat[None, None].float(), size=(h, w), mode="nearest")[0, 0]
    return (1 - alpha) * rgb.mean(0, keepdim=True).expand(3, -1, -1) + alpha * colormap(normalise(up))


def _panel(image: torch.Tensor) -> "object":
    """[C, h, w] in [0, 1] -> PIL image scaled (nearest) so that its longer side is ~PANEL."""
    from cvformers.images import to_pil

    img = to_pil(image.expand(3, -1, -1) if image.shape[0] == 1 else image)
    scale = max(1, round(PANEL / max(img.size)))
    return img.resize((img.size[0] * scale, img.size[1] * scale), resample=0)


class Figure:
    """Titled sections of labelled panels on a white canvas, written as one PNG."""

    def __init__(self):
        self.sections: list[tuple[str, list[list[tuple[str, torch.Tensor]]]]] = []

    def add(self, title: str, rows: list[list[tuple[str, torch.Tensor]]]) -> None:
        self.sections.append((title, rows))

    def render(self):
        from PIL import Image, ImageDraw

        gap, label_h, title_h = 6, 14, 20
        blocks = []
        for title, rows in self.sections:
            panels = [[(label, _panel(img)) for label, img in row] for row in rows]
            pw = max(p.size[0] for row in panels for _, p in row)
            ph = max(p.size[1] for row in panels for _, p in row)
            ncol = max(len(row) for row in panels)
            width = ncol * (pw + gap) + gap
            height = title_h + len(panels) * (ph + label_h + gap) + gap
            block = Image.new("RGB", (max(width, 8 * len(title) + 2 * gap), height), "white")
            draw = ImageDraw.Draw(block)
            draw.text((gap, 4), title, fill="black")
            for r, row in enumerate(panels):
                for c, (label, p) in enumerate(row):
                    x, y = gap + c * (pw + gap), title_h + r * (ph + label_h + gap)
                    draw.text((x, y), label, fill="black")
                    block.paste(p, (x, y + label_h))
            blocks.append(block)
        width = sum(b.size[0] for b in blocks)
        canvas = Image.new("RGB", (width, max(b.size[1] for b in blocks)), "white")
        x = 0
        for b in blocks:
            canvas.paste(b, (x, 0))
            x += b.size[0]
        return canvas

    def save(self, path: str | Path) -> Path:
        from io import BytesIO

        buf = BytesIO()
        self.render().save(buf, format="PNG")
        atomic_write_bytes(Path(path), buf.getvalue())
        return Path(path)


def _mark_patch(image: torch.Tensor, row: int, col: int, patch: int) -> torch.Tensor:
    """Draw a red frame around patch (row, col) of image [C, H, W] -> [3, H, W]."""
    rgb = (image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]).clone()
    y0, x0 = row * patch, col * patch
    red = torch.tensor([1.0, 0.0, 0.0])[:, None]
    for y in (y0, y0 + patch - 1):
        rgb[:, y, x0 : x0 + patch] = red
    for x in (x0, x0 + patch - 1):
        rgb[:, y0 : y0 + patch, x] = red
    return rgb


# --- the figures ------------------------------------------------------------------------


def vit_attention_figure(classifier, image: torch.Tensor, query: tuple[int, int] | None = None,
                         class_names: list[str] | None = None) -> Figure:
    """All the ViT pictures for one image [C, H, W] in [0, 1] at the model's size.

    ``classifier``: an ``ImageClassifier`` of family vit (or anything with ``backbone``,
    ``mean``, ``std``). ``query``: (row, col) of the patch whose attention is shown
    (default: the centre patch). ``class_names`` name the prediction in the title (else its index).
    """
    vit = classifier.backbone
    grid = (image.shape[-2] // vit.cfg.patch_size, image.shape[-1] // vit.cfg.patch_size)
    row, col = query if query is not None else (grid[0] // 2, grid[1] // 2)
    if not (0 <= row < grid[0] and 0 <= col < grid[1]):
        raise UserError(f"query patch ({row}, {col}) is outside the {grid[0]}x{grid[1]} patch grid")
    maps = vit_attention(vit, (image - classifier.mean[0]) / classifier.std[0])  # as forward() normalises
    heads = maps[0].shape[0]
    rollout = attention_rollout(maps)
    logits = classifier(image[None])[0]
    probs = logits.softmax(-1)
    top = int(probs.argmax())
    predicted = class_names[top] if class_names and top < len(class_names) else str(top)

    fig = Figure()
    rollout_cls = rollout[0, 1:].reshape(grid)
    fig.add(f"input (predicted {predicted}, p={probs[top]:.2f}) / rollout", [[
        ("image", image), ("rollout cls", overlay(image, rollout_cls)),
        (f"query {row},{col}", _mark_patch(image, row, col, vit.cfg.patch_size)),
        ("rollout NxN", colormap(normalise(rollout[1:, 1:]))),
    ]])
    for title, token in (("class token", 0), (f"query patch {row},{col}", 1 + row * grid[1] + col)):
        per = patch_attention(maps, token, grid)  # [layers, heads, gh, gw]
        rows = [[(f"L{layer} h{h}", overlay(image, per[layer, h])) for h in range(heads)]
                + [(f"L{layer} mean", overlay(image, per[layer].mean(0)))] for layer in range(len(maps))]
        fig.add(title, rows)
    fig.add("patch x patch (head mean)", [[(f"L{layer}", colormap(normalise(m.mean(0)[1:, 1:])))]
                                          for layer, m in enumerate(maps)])
    return fig


def attention_mass_mask(attention: torch.Tensor, keep: float = 0.6) -> torch.Tensor:
    """DINO §4.2.1 / Fig. 3: the smallest set of patches holding ``keep`` of the attention mass.

    ``attention``: [..., N] weights of one query over the N patches. Returns a bool mask of the
    same shape: the patches, largest first, until their sum reaches ``keep`` of the total."""
    values, order = attention.sort(dim=-1, descending=True)
    share = values.cumsum(-1) / values.sum(-1, keepdim=True).clamp_min(1e-12)
    before = share - values / values.sum(-1, keepdim=True).clamp_min(1e-12)  # mass of the larger patches
    kept_sorted = before < keep  # a patch is kept while the mass before it is short of `keep`
    return torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)


def _mask_picture(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image where the mask [gh, gw] is set, tinted blue elsewhere (also on a black
    background, as Fashion-MNIST's) -> [3, H, W]."""
    rgb = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
    up = F.interpolate(mask[None, None].float(), size=rgb.shape[-2:], mode="nearest")[0]
    blue = torch.tensor([0.15, 0.3, 0.75]).view(3, 1, 1)
    return up * rgb + (1 - up) * (0.3 * rgb + 0.7 * blue)


def dino_attention_figure(dino, image: torch.Tensor, keep: float = 0.6) -> Figure:
    """The DINO pictures (§4.2.1, Fig. 1 and 3) for one image [C, H, W] in [0, 1]: the last
    layer's [CLS] self-attention of each head over the patches, and each head's mask of the
    patches that hold ``keep`` (60%) of its attention mass. ``dino``: a ``DINO`` model (a run's
    teacher) whose backbone is a ViT."""
    vit = dino.backbone
    grid = (image.shape[-2] // vit.cfg.patch_size, image.shape[-1] // vit.cfg.patch_size)
    maps = vit_attention(vit, (image - dino.mean[0]) / dino.std[0])
    last = maps[-1][:, 0, 1:].reshape(-1, *grid)  # [heads, gh, gw]: where [CLS] looks in the last layer
    masks = attention_mass_mask(last.flatten(1), keep).reshape_as(last)
    heads = last.shape[0]
    fig = Figure()
    fig.add("input / head mean", [[("image", image), ("cls mean", overlay(image, last.mean(0))),
                                   (f"mask {keep:.0%} mean", _mask_picture(image, attention_mass_mask(
                                       last.mean(0).flatten(), keep).reshape(grid)))]])
    fig.add(f"last layer [CLS] attention, {heads} heads", [[(f"head {h}", overlay(image, last[h])) for h in range(heads)]])
    fig.add(f"masks: {keep:.0%} of the attention mass", [[(f"head {h}", _mask_picture(image, masks[h]))
                                                          for h in range(heads)]])
    return fig


def clip_attention_figure(clip, image: torch.Tensor) -> Figure:
    """A CLIP ViT image tower's attention for one image [C, H, W] in [0, 1] at the tower's size:
    the last layer's [CLS] attention per head (the token pooled into the image embedding), their
    mean, and attention rollout from [CLS] through all layers."""
    if clip.cfg.image_encoder != "vit":
        raise UserError(f"attention pictures of a CLIP need its ViT image tower; this one is a {clip.cfg.image_encoder}")
    pixels = image.expand(3, -1, -1) if image.shape[0] == 1 and clip.cfg.in_channels == 3 else image
    maps = [m[0] for m in clip.visual.attention_maps(((pixels - clip.pixel_mean[0]) / clip.pixel_std[0])[None])]
    grid = (image.shape[-2] // clip.cfg.patch_size, image.shape[-1] // clip.cfg.patch_size)
    last = maps[-1][:, 0, 1:].reshape(-1, *grid)  # [heads, gh, gw]
    rollout = attention_rollout(maps)[0, 1:].reshape(grid)
    fig = Figure()
    fig.add("input / [CLS] attention", [[("image", image), ("last layer mean", overlay(image, last.mean(0))),
                                         ("rollout", overlay(image, rollout))]])
    fig.add(f"last layer [CLS] attention, {last.shape[0]} heads",
            [[(f"head {h}", overlay(image, last[h])) for h in range(last.shape[0])]])
    return fig


@torch.no_grad()
def dalle_text_attention(pipe, prompt: str, seed: int = 0) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Which caption words a DALL-E sample's image positions read: one sample of ``pipe`` (a
    ``TextToImage``) for ``prompt``, then the attention of each image position to each caption
    token, averaged over heads and layers (every pattern lets an image position read all of the
    text, so every layer counts).

    Returns (the image [C, H, W], the caption's tokens as text, heat [tokens, grid, grid]: the
    share of an image position's attention that goes to each token).
    """
    model, T, G = pipe.model, pipe.model.cfg.text_len, pipe.model.cfg.grid_size
    result = pipe.generate(prompt, 1, seed=seed)
    text = pipe.encode_prompt(prompt)
    maps = model.eval().attention_maps(text, result.codes[:1].to(pipe.device))
    image_to_text = torch.stack([m[0, :, T:, :T] for m in maps]).mean(dim=(0, 1))  # [grid², T]
    ids = [int(i) for i in text[0].tolist() if int(i) < pipe.tokenizer.vocab_size]  # the caption, not the pads
    words = [pipe.tokenizer.decode([i]) or "?" for i in ids]
    return result.images[0], words, image_to_text[:, : len(ids)].T.reshape(len(ids), G, G).cpu()


def dalle_text_attention_figure(image: torch.Tensor, words: list[str], heat: torch.Tensor, prompt: str) -> Figure:
    """The picture of ``dalle_text_attention``: the sample, the share of attention it gives the
    caption at all, and one map per caption token (labelled with its mean share)."""
    fig = Figure()
    fig.add(f'"{prompt}"', [[("sample", image), ("to the caption", overlay(image, heat.sum(0)))]])
    fig.add("image positions -> caption token (mean over heads and layers)",
            [[(f"{w} {float(h.mean()):.2f}", overlay(image, h)) for w, h in zip(words, heat)]])
    return fig


def mixer_token_mixing_figure(mixer, blocks: list[int] | None = None, units: int = 16) -> Figure:
    """Token-mixing weights of the first ``units`` hidden units of ``blocks`` (default: the
    first three) as images over the patch grid, blue = negative, red = positive."""
    depth = len(mixer.blocks)
    blocks = blocks if blocks is not None else list(range(min(3, depth)))
    fig = Figure()
    for b in blocks:
        if not 0 <= b < depth:
            raise UserError(f"block {b} does not exist; the model has blocks 0..{depth - 1}")
        weights = mixer.token_mixing_weights(b)[:units]
        panels = []
        for i, w in enumerate(weights):
            scale = w.abs().max().clamp_min(1e-12)
            panels.append((f"unit {i}", colormap(0.5 + 0.5 * w / scale, _SIGNED)))
        ncol = int(math.ceil(math.sqrt(len(panels))))
        fig.add(f"block {b} token-mixing units", [panels[i : i + ncol] for i in range(0, len(panels), ncol)])
    return fig


# --- from files -------------------------------------------------------------------------


def load_classifier(model: str | Path):
    """A trained ``ImageClassifier`` from a run folder, or an untrained one from a preset name.

    A run's classifier carries ``class_names`` (from its ``[data]`` table, None when the data
    names no classes), which the pictures' titles use."""
    from cvformers.models.vision import PRESETS, ImageClassifier, classifier_config

    if Path(model).is_dir():
        from cvformers.data.labels import class_names
        from cvformers.loading import load_run

        classifier, cfg = load_run(model)
        if cfg.get("kind") != "classifier":
            raise UserError(f"{model} is a {cfg.get('kind')!r} run, not a classifier")
        classifier.class_names = class_names(str(cfg.get("data", {}).get("name", "")))
        return classifier
    if str(model) in PRESETS:
        print(f"notice: {model} is a preset name, not a run folder: its weights are random", file=sys.stderr)
        return ImageClassifier(classifier_config(str(model))).eval()
    raise UserError(f"{model}: neither a run folder nor a model preset (see `cvformers models`)")


def attention_picture(classifier, image=None, query: tuple[int, int] | None = None, units: int = 16) -> Figure:
    """The figure for a loaded classifier: a ViT's attention maps for ``image`` (a path, a PIL
    image or a [C, H, W] tensor in [0, 1], fitted to the model's size), or a Mixer's
    token-mixing weights (no image needed)."""
    family = classifier.cfg.family
    if family == "vit":
        if image is None:
            raise UserError("a ViT's attention maps need an image: give IMAGE")
        pixels = load_image(image, classifier.image_size, classifier.in_chans)
        with torch.no_grad():
            return vit_attention_figure(classifier, pixels, query, getattr(classifier, "class_names", None))
    if family == "mixer":
        return mixer_token_mixing_figure(classifier.backbone, units=units)
    raise UserError(f"attention pictures exist for vit and mixer models; this one is a {family}")


def _run_kind(model: str | Path) -> str | None:
    """The ``kind`` of a run folder or shipped part (``default/clip``), None for anything else."""
    from cvformers.config import load_toml
    from cvformers.loading import SHIPPED, resolve_run

    folder = resolve_run(model) if str(model).split("/")[0] in SHIPPED else Path(model)
    config = folder / "config.toml"
    return load_toml(config).get("kind") if config.is_file() else None


def attention_figure(model: str | Path, image: str | Path | None, out: str | Path,
                     query: tuple[int, int] | None = None, units: int = 16, keep: float = 0.6,
                     prompt: str | None = None, seed: int = 0) -> Path:
    """``cvformers attention``: the figure for a ViT run (needs ``image``) or a Mixer run; for a
    dino run, its teacher's last-layer [CLS] attention per head and the ``keep``-mass masks; for a
    CLIP run (``default/clip``: the shipped one) its ViT image tower's [CLS] attention and rollout;
    for a DALL-E run or bundle (``default``) and a ``prompt``, which caption words a sample reads."""
    if not 0 < keep <= 1:
        raise UserError(f"--keep is a share of the attention mass in (0, 1], got {keep}")
    kind = _run_kind(model)
    if (kind == "dalle") != (prompt is not None):
        raise UserError("--prompt goes with a DALL-E model (e.g. --model default), and a DALL-E model needs --prompt")
    if kind == "dalle":
        from cvformers.pipelines.text_to_image import TextToImage

        if image is not None:
            raise UserError("a DALL-E attention picture draws its own sample: give --prompt, not IMAGE")
        drawn, words, heat = dalle_text_attention(TextToImage.load(model), prompt, seed)
        return dalle_text_attention_figure(drawn, words, heat, prompt).save(out)
    if kind == "clip":
        from cvformers.loading import load_clip

        clip, _ = load_clip(model)
        if image is None:
            raise UserError("a CLIP's attention maps need an image: give IMAGE")
        pixels = load_image(image, clip.cfg.image_size, clip.cfg.in_channels)
        with torch.no_grad():
            return clip_attention_figure(clip, pixels).save(out)
    if kind == "dino":
        from cvformers.loading import TEACHER_WEIGHTS, load_run

        weights = TEACHER_WEIGHTS if (Path(model) / TEACHER_WEIGHTS).is_file() else None
        dino, _ = load_run(model, weights=weights)
        if dino.cfg.family != "vit":
            raise UserError(f"attention pictures of a dino run need a ViT backbone; this one is a {dino.cfg.family}")
        if image is None:
            raise UserError("a ViT's attention maps need an image: give IMAGE")
        pixels = load_image(image, dino.image_size, dino.in_chans)
        with torch.no_grad():
            return dino_attention_figure(dino, pixels, keep).save(out)
    return attention_picture(load_classifier(model), image, query, units).save(out)
