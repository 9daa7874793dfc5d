"""``shapes``: the built-in captioned dataset and the project's exact benchmark of caption fidelity.

Every item is a black canvas with one or two flat-coloured objects and a caption that
describes it ("a small blue square on the left", "a yellow triangle above a large green
plus"). Scenes are a pure function of (split, seed, index): item i renders the same picture
and caption on every call, every epoch and every machine, so nothing is stored on disk.

Layout, chosen so that a small DALL-E with an 8×8 token grid can learn it and so that a
caption pins the picture down: objects sit on a coarse 3×3 grid of slots (x and y at 1/4,
1/2, 3/4 of the canvas), never overlap, and a small object may move by a pixel or two
around its slot. Sizes are odd pixel counts so shapes centre exactly on a pixel.

Held-out compositions: the colour–shape pairs in ``HELDOUT_PAIRS`` never appear in the
``train`` and ``test`` splits; the ``heldout`` split contains only scenes that use at least
one of them (zero-shot generation, DALL-E §3.2 in spirit). The two objects of a scene have
different colours, so a caption can name each object by its colour and the checker
(``cvformers.eval.fidelity``) can find it unambiguously.
"""

from __future__ import annotations

import copy
import random
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

from cvformers.errors import UserError

# Exact RGB values, part of the data's definition (the shipped model and every figure depend on them). The checker classifies pixels against this table.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "cyan": (30, 200, 220),
    "white": (235, 235, 235),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "plus")
SIZES = ("small", "large")
RELATIONS = ("above", "below", "left of", "right of")
# Colour–shape pairs that never occur in train/test; the heldout split is made of them.
HELDOUT_PAIRS = frozenset({("red", "triangle"), ("green", "plus"), ("blue", "circle"), ("yellow", "square")})
TRAIN_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS)
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
_HELDOUT_SORTED = tuple(sorted(HELDOUT_PAIRS))

# Slot grid: names of the 3×3 positions -> (column, row) in {0, 1, 2}.
POSITIONS: dict[str, tuple[int, int]] = {
    "center": (1, 1),
    "left": (0, 1),
    "right": (2, 1),
    "top": (1, 0),
    "bottom": (1, 2),
    "top left": (0, 0),
    "top right": (2, 0),
    "bottom left": (0, 2),
    "bottom right": (2, 2),
}

SPLITS = {"train": 0, "test": 1, "heldout": 2}
DEFAULT_SIZES = {"train": 50_000, "test": 2_000, "heldout": 2_000}

# --- caption vocabulary: several words per concept so the text model has to read ------------
_SHAPE_WORDS = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangle"),
    "plus": ("plus", "cross", "plus sign"),
}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
_COLOUR_WORDS = {c: (c,) for c in COLOURS} | {"purple": ("purple", "violet")}
_POSITION_PHRASES = {
    "center": ("in the center", "in the middle", "in the centre"),
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "at the top edge"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom edge"),
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
# "A <rel> B" and the inverse phrasing "B <inverse rel> A" describe the same scene.
_RELATION_PHRASES = {
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
}
_INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
_FRAMES = ("{}", "{}", "{}", "an image of {}", "a picture of {}", "{} on a black background", "a drawing of {}")


def object_sizes(image_size: int) -> dict[str, int]:
    """Side in pixels of small (~1/4 canvas) and large (~1/2 canvas) objects; always odd.

    Large is the biggest odd side that still leaves a one-pixel gap between two large
    objects in neighbouring half-canvas slots (15 px at 32, 31 px at 64).
    """
    small = 2 * round(image_size / 8) + 1
    large = 2 * ((image_size // 2 - 1) // 2) + 1
    return {"small": small, "large": large}


def slot_centers(image_size: int) -> tuple[int, int, int]:
    """Pixel coordinates of the three slot lines (1/4, 1/2, 3/4 of the canvas)."""
    return (image_size // 4, image_size // 2, (3 * image_size) // 4)


@lru_cache(maxsize=64)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Binary [side, side] mask of a shape filling its box, by 4×4 supersampled coverage ≥ 1/2."""
    ss = 4
    coords = (np.arange(side * ss) + 0.5) / (side * ss)  # sample centres in [0, 1]
    y, x = np.meshgrid(coords, coords, indexing="ij")
    if shape == "circle":
        inside = (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    elif shape == "square":
        inside = np.ones_like(x, dtype=bool)
    elif shape == "triangle":  # apex at top centre, base along the bottom edge
        inside = np.abs(x - 0.5) <= 0.5 * y
    elif shape == "plus":  # two bars, each a third of the side thick
        third = 1.0 / 3.0
        inside = (np.abs(x - 0.5) <= third / 2) | (np.abs(y - 0.5) <= third / 2)
    else:
        raise UserError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    coverage = inside.reshape(side, ss, side, ss).mean(axis=(1, 3))
    return coverage >= 0.5


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _describe(obj: dict, rng: random.Random, with_size: bool = True, with_colour: bool = True) -> str:
    words = []
    if with_size:
        words.append(rng.choice(_SIZE_WORDS[obj["size"]]))
    if with_colour:
        words.append(rng.choice(_COLOUR_WORDS[obj["colour"]]))
    words.append(rng.choice(_SHAPE_WORDS[obj["shape"]]))
    return _a(" ".join(words))


def caption_for(record: dict, rng: random.Random, uncoloured: tuple[int, ...] = ()) -> str:
    """One caption for a scene record, with templates and synonyms drawn from ``rng``.

    ``uncoloured``: indices of objects whose colour the caption leaves out (see
    ``colourless_caption``); with the default, the draws from ``rng`` are those of every release.
    """
    objs = record["objects"]
    if record["relation"] is None:
        text = _describe(objs[0], rng, with_colour=0 not in uncoloured)
        if objs[0]["position_stated"]:
            text += " " + rng.choice(_POSITION_PHRASES[objs[0]["position"]])
    else:
        with_size = rng.random() < 0.75  # sometimes sizes are left for the model to choose
        a, b, rel = 0, 1, record["relation"]
        if rng.random() < 0.5:  # say it the other way round: "B below A" == "A above B"
            a, b, rel = b, a, _INVERSE[rel]
        first = _describe(objs[a], rng, with_size, a not in uncoloured)  # draws in the order of the words
        text = f"{first} {rng.choice(_RELATION_PHRASES[rel])} {_describe(objs[b], rng, with_size, b not in uncoloured)}"
    return rng.choice(_FRAMES).format(text)


# --- wordings as people type them ----------------------------------------------------------
# Everyday rewordings of the same scene: what a user types rather than the template. A model
# trained only on "a red circle above a blue square" reads "red circle above blue square" or
# "the red circle is above the blue square" as unfamiliar text; training with some of these
# (``[data] paraphrase``) teaches it that they mean the same. Only words and relations of the
# template vocabulary, plus the glue words "the", "is", "there", "with", "and", "it".
PARAPHRASE_FORMS = ("no articles", "the", "is", "there is", "with it")


def _phrase(obj: dict, rng: random.Random, article: str, with_size: bool = True) -> str:
    words = ([rng.choice(_SIZE_WORDS[obj["size"]])] if with_size else []) + [
        rng.choice(_COLOUR_WORDS[obj["colour"]]), rng.choice(_SHAPE_WORDS[obj["shape"]])]
    text = " ".join(words)
    return {"": text, "the": "the " + text, "a": _a(text)}[article]


def paraphrase_caption(record: dict, rng: random.Random, form: str | None = None) -> str:
    """A caption of ``record`` in one of ``PARAPHRASE_FORMS`` (drawn from ``rng`` when not given).

    "small red circle above large blue square" (no articles), "the red circle below the blue
    square", "the red circle is above the blue square", "there is a red circle above a blue
    square", "a blue square with a red circle above it" (the relation said from the other object).
    A single object: "red circle on the left", "the red circle is on the left", "there is a red
    circle on the left".
    """
    objs = record["objects"]
    forms = PARAPHRASE_FORMS if record["relation"] is not None else PARAPHRASE_FORMS[:4]
    form = form or rng.choice(forms)
    if form not in forms:
        raise UserError(f"unknown caption form {form!r} for this scene; known: {', '.join(forms)}")
    article = {"no articles": "", "the": "the", "is": rng.choice(("the", "a")), "there is": "a", "with it": "a"}[form]
    if record["relation"] is None:
        obj = objs[0]
        where = rng.choice(_POSITION_PHRASES[obj["position"]]) if obj["position_stated"] else ""
        if form == "is" and not where:
            form = "the"  # "the red circle is" says nothing: keep the phrase
        text = _phrase(obj, rng, article)
        text = {"is": f"{text} is {where}", "there is": f"there is {text} {where}"}.get(form, f"{text} {where}")
        return text.strip()
    with_size = rng.random() < 0.75
    a, b, rel = 0, 1, record["relation"]
    if rng.random() < 0.5:
        a, b, rel = b, a, _INVERSE[rel]
    first, second = _phrase(objs[a], rng, article, with_size), _phrase(objs[b], rng, article, with_size)
    relation = rng.choice(_RELATION_PHRASES[rel])
    if form == "is":
        return f"{first} is {relation} {second}"
    if form == "there is":
        return f"there is {first} {relation} {second}"
    if form == "with it":  # "B with A <rel> it": the first-named object is the relation's object
        return f"{second} with {first} {relation} it"
    return f"{first} {relation} {second}"


def zero_shot_templates() -> list[str]:
    """Zero-shot prompt templates in the training wording, for a CLIP trained on shapes: every
    size and colour ("a large red {}"), averaged as CLIP's prompt ensembling does (CLIP §3.1.4).
    Shapes captions always name a colour, so "a photo of a {}." is text such a CLIP never read."""
    return [f"a {size} {colour} {{}}" for colour in COLOURS for size in SIZES]


def colourless_caption(record: dict, rng: random.Random) -> str:
    """A caption still true of ``record`` that leaves out the colour of one object or of all.

    "a small triangle on the left", "a red circle above a square". A contrastive model trained
    with some of these (``[text] colourless_captions`` of a CLIP run) must match a triangle's
    shape whatever its colour, so its shape features cannot lean on the colours a shape was
    seen in: what lets it read a colour–shape pair it never saw (the held-out split). Only
    words of the training captions are used, and no held-out pair is ever drawn or named.
    """
    n = len(record["objects"])
    if n == 1 or rng.random() < 0.5:
        uncoloured = tuple(range(n))
    else:
        uncoloured = (rng.randrange(n),)
    return caption_for(record, rng, uncoloured)


def hard_negative_caption(record: dict, rng: random.Random) -> str:
    """A caption that is wrong for ``record`` in exactly one detail, for contrastive training with
    hard negatives (NegCLIP, Yuksekgonul et al. 2023, §5: captions whose word order or one word is
    changed, so that a bag-of-words match no longer wins).

    One of: an object's colour or shape replaced, the two objects' colours or shapes swapped (the
    binding of attribute to object), the relation inverted with the objects kept in place, a single
    object's size or stated position changed. Only training colour–shape pairs are written (a
    negative never names a held-out composition), and the changed detail is always one the
    caption states.
    """
    objs = record["objects"]
    kinds = ["colour", "shape"] + (["swap colours", "swap shapes", "relation"] if len(objs) == 2 else
                                   ["size", "position"])
    return caption_for(_changed_record(record, rng, kinds), rng)


def hard_negative_image(record: dict, rng: random.Random) -> torch.Tensor:
    """The picture of ``record`` wrong in exactly one detail: an object's colour or shape replaced,
    or (two objects) their colours or shapes swapped; everything else in place, pixel for pixel.

    The image-side counterpart of ``hard_negative_caption``: a contrastive model that must rank
    a caption's own picture above this one learns to rank near-identical pictures by the
    colour–shape binding, which is what a reranker of generated candidates has to do (the
    synthetic negative images of TripletCLIP, Patel et al. 2024, made exact here by the renderer).
    Only training colour–shape pairs are drawn.
    """
    kinds = ["colour", "shape"] + (["swap colours", "swap shapes"] if len(record["objects"]) == 2 else [])
    return render(_changed_record(record, rng, kinds))


def _changed_record(record: dict, rng: random.Random, kinds: list[str]) -> dict:
    """A copy of ``record`` with one detail of a kind in ``kinds`` changed, using training pairs only."""
    for _ in range(50):
        neg = copy.deepcopy(record)
        nobjs, kind = neg["objects"], rng.choice(kinds)
        target = rng.choice(nobjs)
        if kind == "colour":
            target["colour"] = rng.choice([c for c in COLOURS if c not in {o["colour"] for o in nobjs}])
        elif kind == "shape":
            target["shape"] = rng.choice([s for s in SHAPES if s != target["shape"]])
        elif kind == "swap colours":
            nobjs[0]["colour"], nobjs[1]["colour"] = nobjs[1]["colour"], nobjs[0]["colour"]
        elif kind == "swap shapes":
            if nobjs[0]["shape"] == nobjs[1]["shape"]:
                continue
            nobjs[0]["shape"], nobjs[1]["shape"] = nobjs[1]["shape"], nobjs[0]["shape"]
        elif kind == "relation":
            neg["relation"] = _INVERSE[neg["relation"]]
        elif kind == "size":
            target["size"] = "large" if target["size"] == "small" else "small"
        else:  # position: a different slot, always stated
            target["position"] = rng.choice([p for p in POSITIONS if p != target["position"]])
            target["position_stated"] = True
        if all((o["colour"], o["shape"]) in TRAIN_PAIRS for o in nobjs):
            return neg
    raise UserError(f"no hard negative found for the scene {record.get('caption', record)!r}")


def _place(obj: dict, col: int, row: int, image_size: int, rng: random.Random, jitter: int) -> None:
    side = object_sizes(image_size)[obj["size"]]
    lines = slot_centers(image_size)
    cx, cy = lines[col], lines[row]
    if obj["size"] == "small" and jitter:  # large objects fill their slot; only small ones move
        cx += rng.randint(-jitter, jitter)
        cy += rng.randint(-jitter, jitter)
    x0, y0 = cx - side // 2, cy - side // 2
    obj["center"] = [cx, cy]
    obj["bbox"] = [x0, y0, x0 + side, y0 + side]  # x0, y0, x1, y1 (exclusive), pixels


def sample_record(split: str, rng: random.Random, image_size: int = 32, two_object_prob: float = 0.5,
                  center_prob: float = 0.3, jitter: int | None = None) -> dict:
    """Draw one scene (without caption) for ``split`` from ``rng``; a plain, collate-friendly dict."""
    if jitter is None:
        jitter = max(0, image_size // 16)
    heldout = split == "heldout"
    pool = sorted(TRAIN_PAIRS) if not heldout else _HELDOUT_SORTED
    n_objects = 2 if rng.random() < two_object_prob else 1
    first = rng.choice(pool)
    pairs = [first]
    if n_objects == 2:
        # In heldout the other object may be anything; in train/test only allowed pairs.
        others = [p for p in (ALL_PAIRS if heldout else TRAIN_PAIRS) if p[0] != first[0]]
        pairs.append(rng.choice(others))
        rng.shuffle(pairs)
    objects = [
        {"colour": c, "shape": s, "size": rng.choice(SIZES), "position": "center", "position_stated": True}
        for c, s in pairs
    ]
    if n_objects == 1:
        obj = objects[0]
        if rng.random() < center_prob:
            obj["position"] = "center"
            obj["position_stated"] = rng.random() < 0.5  # "a large red circle" means centred
        else:
            obj["position"] = rng.choice([p for p in POSITIONS if p != "center"])
        _place(obj, *POSITIONS[obj["position"]], image_size, rng, jitter)
        relation = None
    else:
        relation = rng.choice(RELATIONS)
        # objects[0] <relation> objects[1]: the pair sits on the centre line of the canvas.
        slots = {"above": ("top", "bottom"), "below": ("bottom", "top"),
                 "left of": ("left", "right"), "right of": ("right", "left")}[relation]
        for obj, pos in zip(objects, slots):
            obj["position"] = pos
            _place(obj, *POSITIONS[pos], image_size, rng, jitter)
    return {"objects": objects, "relation": relation, "image_size": image_size}


def render(record: dict, image_size: int | None = None) -> torch.Tensor:
    """Draw a record: FloatTensor[3, H, W] in [0, 1], black background, exact palette colours."""
    size = image_size or record["image_size"]
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    for obj in record["objects"]:
        x0, y0, x1, y1 = obj["bbox"]
        mask = shape_mask(obj["shape"], x1 - x0)
        # clip to the canvas (only matters for hand-made records)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        sub = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        canvas[cy0:cy1, cx0:cx1][sub] = PALETTE[obj["colour"]]
    return torch.from_numpy(canvas).permute(2, 0, 1).float().div_(255.0)


class ShapesDataset(Dataset):
    """Procedural captioned scenes; item i of (split, seed) is always the same picture and caption.

    ``test`` is the train distribution drawn from different random streams; ``heldout``
    uses the held-out colour–shape pairs. Items: {"image", "caption", "label": -1, "record"}.
    ``paraphrase``: the share of captions said in an everyday wording (``paraphrase_caption``)
    instead of the template; the scenes do not change.
    """

    def __init__(self, split: str = "train", image_size: int = 32, size: int | None = None, seed: int = 0,
                 two_object_prob: float = 0.5, center_prob: float = 0.3, jitter: int | None = None,
                 channels: int = 3, paraphrase: float = 0.0):
        if split not in SPLITS:
            raise UserError(f"shapes has no split {split!r}; known: {', '.join(SPLITS)}")
        if image_size < 16:
            raise UserError(f"shapes needs image_size >= 16, got {image_size}")
        if channels not in (1, 3):
            raise UserError(f"channels must be 1 or 3, got {channels}")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.size = DEFAULT_SIZES[split] if size is None or size <= 0 else int(size)
        self.two_object_prob, self.center_prob, self.jitter = two_object_prob, center_prob, jitter
        self.channels = channels
        if not 0.0 <= paraphrase <= 1.0:
            raise UserError(f"paraphrase is a share between 0 and 1, got {paraphrase}")
        self.paraphrase, self.epoch = float(paraphrase), 0

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        # A string seed goes through SHA-512 in CPython: stable across runs and PYTHONHASHSEED.
        return random.Random(f"shapes/{self.seed}/{self.split}/{index}")

    def record(self, index: int) -> dict:
        return self.item(index)["record"]

    def item(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = self._rng(index)
        rec = sample_record(self.split, rng, self.image_size, self.two_object_prob, self.center_prob, self.jitter)
        caption = caption_for(rec, rng)
        if self.paraphrase:
            # its own stream, so that the scenes and template captions stay those of paraphrase = 0;
            # the epoch in the seed gives an item other wordings in other epochs (``set_epoch``)
            wording = random.Random(f"shapes/{self.seed}/{self.split}/{index}/wording/{self.epoch}")
            if wording.random() < self.paraphrase:
                caption = paraphrase_caption(rec, wording)
        rec["caption"] = caption
        return {"caption": caption, "label": -1, "record": rec}

    def set_epoch(self, epoch: int) -> None:
        """The trainer calls this each epoch: with ``paraphrase`` > 0 an item's wording changes."""
        self.epoch = int(epoch)

    def caption(self, index: int) -> str:
        return self.item(index)["caption"]

    def __getitem__(self, index: int) -> dict:
        out = self.item(index)
        image = render(out["record"], self.image_size)
        if self.channels == 1:
            image = image.mean(0, keepdim=True)
        return {"image": image, **out}

    def captions(self, n: int | None = None) -> list[str]:
        """Captions of the first ``n`` items (no rendering): for tokenizer training and evaluation."""
        return [self.item(i)["caption"] for i in range(min(n or self.size, self.size))]


# --- captions back to records: score any prompt written in the shapes grammar ---------------
def _alternation(words) -> str:
    import re

    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


def _word_maps():
    size = {w: k for k, ws in _SIZE_WORDS.items() for w in ws}
    colour = {w: k for k, ws in _COLOUR_WORDS.items() for w in ws}
    shape = {w: k for k, ws in _SHAPE_WORDS.items() for w in ws}
    position = {w: k for k, ws in _POSITION_PHRASES.items() for w in ws}
    relation = {w: k for k, ws in _RELATION_PHRASES.items() for w in ws}
    return size, colour, shape, position, relation


def parse_caption(text: str, image_size: int = 32) -> dict:
    """The record a caption in the shapes grammar describes (what ``check_image`` scores against).

    "a small red circle above a large blue square" -> two objects and the relation "above";
    unstated sizes are None (not checked), an unstated single-object position is not checked.
    Raises UserError for text outside the grammar.
    """
    import re

    size_w, colour_w, shape_w, pos_w, rel_w = _word_maps()
    obj = (rf"(?:an? |the )?(?:({_alternation(size_w)}) )?({_alternation(colour_w)}) "
           rf"({_alternation(shape_w)})")
    t = " ".join(text.lower().split()).strip(" .")
    t = re.sub(r"^(?:an image of|a picture of|a drawing of|a photo of|there is|there's) ", "", t)
    t = re.sub(r" on a black background$", "", t)

    def make(m, offset):
        size, colour, shape = m.group(offset), m.group(offset + 1), m.group(offset + 2)
        return {"colour": colour_w[colour], "shape": shape_w[shape], "size": size_w.get(size),
                "position": "center", "position_stated": True}

    m = re.fullmatch(rf"{obj} (?:is )?({_alternation(rel_w)}) {obj}", t)
    with_it = re.fullmatch(rf"{obj} with {obj} ({_alternation(rel_w)}) it", t)
    if m or with_it:
        if m:
            objects, relation = [make(m, 1), make(m, 5)], rel_w[m.group(4)]
        else:  # "B with A <rel> it" says "A <rel> B"
            objects, relation = [make(with_it, 4), make(with_it, 1)], rel_w[with_it.group(7)]
        if objects[0]["colour"] == objects[1]["colour"]:
            raise UserError(f"the two objects of {text!r} have the same colour; shapes scenes never do")
        slots = {"above": ("top", "bottom"), "below": ("bottom", "top"),
                 "left of": ("left", "right"), "right of": ("right", "left")}[relation]
        for o, pos in zip(objects, slots):
            o["position"] = pos
    else:
        m = re.fullmatch(rf"{obj}(?: (?:is )?({_alternation(pos_w)}))?", t)
        if not m:
            raise UserError(f"{text!r} is not a shapes caption (e.g. 'a small red circle on the left', "
                            "'a blue square above a yellow plus')")
        objects, relation = [make(m, 1)], None
        if m.group(4):
            objects[0]["position"] = pos_w[m.group(4)]
        else:
            objects[0]["position_stated"] = False
    rng = random.Random(0)
    for o in objects:
        placed = dict(o, size=o["size"] or "small")
        _place(placed, *POSITIONS[o["position"]], image_size, rng, jitter=0)
        o["center"], o["bbox"] = placed["center"], placed["bbox"]
    return {"objects": objects, "relation": relation, "image_size": image_size, "caption": text}
