"""shapes: determinism, held-out compositions, collate, and the fidelity checker's validation."""

import copy

import pytest
import torch

from cvformers.config import ConfigError
from cvformers.data import DataConfig, build_dataset, build_from_config, collate
from cvformers.data.shapes import COLOURS, HELDOUT_PAIRS, PALETTE, SHAPES, ShapesDataset, parse_caption, render
from cvformers.errors import UserError
from cvformers.eval.fidelity import check_image, fidelity, fidelity_report, gaussian_blur


def _batch(split="train", n=200, image_size=32, seed=0):
    ds = build_dataset("shapes", split, image_size=image_size, size=n, seed=seed)
    return collate([ds[i] for i in range(n)])


def test_items_are_deterministic_and_splits_differ():
    a, b = ShapesDataset("train", size=10, seed=3), ShapesDataset("train", size=10, seed=3)
    for i in (0, 7):
        assert a[i]["caption"] == b[i]["caption"]
        assert torch.equal(a[i]["image"], b[i]["image"])
    test = ShapesDataset("test", size=10, seed=3)
    assert [a[i]["caption"] for i in range(10)] != [test[i]["caption"] for i in range(10)]
    assert len(ShapesDataset("train")) == 50_000 and len(ShapesDataset("heldout")) == 2_000


def test_item_format_and_palette():
    item = ShapesDataset("train", size=5, image_size=64)[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["label"] == -1 and isinstance(item["caption"], str) and item["caption"]
    # every pixel is black or an exact palette colour
    colours = {tuple(int(v) for v in (item["image"][:, y, x] * 255).round()) for y in range(64) for x in range(64)}
    assert colours <= set(PALETTE.values()) | {(0, 0, 0)}
    assert ShapesDataset("train", size=2, channels=1)[0]["image"].shape == (1, 32, 32)


def test_heldout_pairs_only_in_heldout_split():
    for split in ("train", "test"):
        ds = ShapesDataset(split, size=400)
        for i in range(len(ds)):
            for o in ds.record(i)["objects"]:
                assert (o["colour"], o["shape"]) not in HELDOUT_PAIRS
    ds = ShapesDataset("heldout", size=200)
    for i in range(len(ds)):
        assert any((o["colour"], o["shape"]) in HELDOUT_PAIRS for o in ds.record(i)["objects"])


def test_objects_inside_canvas_and_disjoint():
    for size in (32, 64):
        ds = ShapesDataset("train", size=300, image_size=size)
        for i in range(len(ds)):
            objs = ds.record(i)["objects"]
            for o in objs:
                x0, y0, x1, y1 = o["bbox"]
                assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            if len(objs) == 2:
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = objs[0]["bbox"], objs[1]["bbox"]
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
                assert objs[0]["colour"] != objs[1]["colour"]


def test_collate_and_build_dataset():
    b = _batch(n=4)
    assert b["image"].shape == (4, 3, 32, 32) and b["label"].tolist() == [-1] * 4
    assert len(b["caption"]) == 4 and isinstance(b["record"][0], dict)
    with pytest.raises(ConfigError, match="known: shapes"):
        build_dataset("imagenet")
    with pytest.raises(UserError):
        build_dataset("shapes", split="validation")
    ds = build_from_config(DataConfig(size=7, eval_size=5), "heldout")
    assert len(ds) == 5 and ds.split == "heldout"


@pytest.mark.parametrize("split,size", [("train", 32), ("heldout", 32), ("train", 64)])
def test_checker_on_ground_truth(split, size):
    b = _batch(split, n=150, image_size=size)
    assert fidelity(b["image"], b["record"]) >= 0.99


def test_checker_on_blurred_noisy_renders():
    g = torch.Generator().manual_seed(0)
    b = _batch("train", n=200)
    x = gaussian_blur(b["image"], 0.7) + 0.04 * torch.randn(b["image"].shape, generator=g)
    # colour drift: each image's channels scaled by up to ±8%
    x = (x * (1 + 0.08 * (2 * torch.rand(len(x), 3, 1, 1, generator=g) - 1))).clamp(0, 1)
    assert fidelity(x, b["record"]) >= 0.95


def test_checker_rejects_noise_and_wrong_captions():
    g = torch.Generator().manual_seed(1)
    b = _batch("train", n=200)
    assert fidelity(torch.rand(b["image"].shape, generator=g), b["record"]) <= 0.02
    assert fidelity(torch.zeros_like(b["image"]), b["record"]) == 0.0
    # another scene's caption: skip pairs that happen to describe the same objects
    key = lambda r: sorted((o["colour"], o["shape"]) for o in r["objects"])  # noqa: E731
    pairs = [(b["image"][i], b["record"][(i + 1) % 200]) for i in range(200)
             if key(b["record"][i]) != key(b["record"][(i + 1) % 200])]
    rep = fidelity_report(torch.stack([p[0] for p in pairs]), [p[1] for p in pairs])
    assert rep["fidelity"] <= 0.02


def _one_object_record():
    ds = ShapesDataset("train", size=200)
    for i in range(200):
        rec = ds.record(i)
        if rec["relation"] is None and rec["objects"][0]["position"] == "left":
            return rec
    raise AssertionError("no single left object in 200 scenes")


def test_checker_marks_swapped_attributes_wrong():
    rec = _one_object_record()
    img = render(rec)
    assert check_image(img, rec)["all_correct"]
    obj = rec["objects"][0]
    for key, value in [("colour", "orange" if obj["colour"] != "orange" else "red"),
                       ("shape", "plus" if obj["shape"] != "plus" else "circle"),
                       ("position", "right")]:
        wrong = copy.deepcopy(rec)
        wrong["objects"][0][key] = value
        res = check_image(img, wrong)
        assert not res["all_correct"], key
        assert not res["objects"][0][f"{key}_ok"], key
    # a two-object scene with its relation reversed
    ds = ShapesDataset("train", size=50)
    rec2 = next(ds.record(i) for i in range(50) if ds.record(i)["relation"] == "above")
    img2 = render(rec2)
    assert check_image(img2, rec2)["all_correct"]
    assert not check_image(img2, {**rec2, "relation": "below"})["all_correct"]
    # an extra object not in the caption
    both = render(rec2)
    single = {**rec2, "objects": rec2["objects"][:1], "relation": None}
    single["objects"][0]["position_stated"] = False
    res = check_image(both, single)
    assert res["extra_objects"] == 1 and not res["all_correct"]


def test_parse_caption_round_trip():
    from cvformers.data.shapes import parse_caption

    for split in ("train", "heldout"):
        ds = ShapesDataset(split, size=300)
        for i in range(300):
            item = ds[i]
            assert check_image(item["image"], parse_caption(item["caption"]))["all_correct"], item["caption"]
    rec = parse_caption("A small red circle above a large blue square.")
    assert [(o["colour"], o["shape"], o["size"]) for o in rec["objects"]] == [("red", "circle", "small"),
                                                                              ("blue", "square", "large")]
    assert rec["relation"] == "above"
    assert parse_caption("a violet plus sign")["objects"][0]["position_stated"] is False
    assert parse_caption("a tiny cyan box in the upper left")["objects"][0]["position"] == "top left"
    for bad in ("a dog", "a red circle above a red square", ""):
        with pytest.raises(UserError):
            parse_caption(bad)


def test_hard_negative_captions_are_wrong_and_name_no_heldout_pair():
    import random

    from cvformers.data.shapes import hard_negative_caption, parse_caption

    data = ShapesDataset("train", size=200)
    for i in range(len(data)):
        item = data[i]
        negative = hard_negative_caption(item["record"], random.Random(item["caption"]))
        assert negative == hard_negative_caption(item["record"], random.Random(item["caption"]))  # seeded
        stated = parse_caption(negative)
        assert not {(o["colour"], o["shape"]) for o in stated["objects"]} & HELDOUT_PAIRS, negative
        assert check_image(item["image"], parse_caption(item["caption"]))["all_correct"]
        verdict = check_image(item["image"], stated)
        # the picture fails the negative: the checker sees it, or (sizes are outside its verdict) the size
        assert not verdict["all_correct"] or not all(o["size_ok"] for o in verdict["objects"]), negative


def test_hard_negative_images_fail_their_caption_by_colour_or_shape_in_place():
    import random

    from cvformers.data.shapes import hard_negative_image

    data = ShapesDataset("train", size=120)
    for i in range(len(data)):
        item = data[i]
        negative = hard_negative_image(item["record"], random.Random(item["caption"]))
        assert torch.equal(negative, hard_negative_image(item["record"], random.Random(item["caption"])))  # seeded
        assert negative.shape == item["image"].shape
        # the caption's own scene is not what it shows (a swap shows as objects out of place)
        assert not check_image(negative, parse_caption(item["caption"]))["all_correct"]
        # every coloured pixel is a training pair's colour at an object's place; the background is untouched
        changed = (negative != item["image"]).any(0)
        inside = torch.zeros_like(changed)
        for obj in item["record"]["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            inside[y0:y1, x0:x1] = True
        assert changed.any() and not (changed & ~inside).any()
        drawn = {tuple(round(255 * v) for v in negative[:, y, x].tolist())
                 for y, x in zip(*torch.where(negative.sum(0) > 0))}
        assert not drawn - {PALETTE[c] for c in PALETTE}


def test_captions_are_those_of_every_release():
    # DALL-E codes, BPE merges and every figure in docs/results.md depend on these exact strings
    assert ShapesDataset("train").item(0)["caption"] == "an image of a big orange plus sign above a huge purple block"
    assert ShapesDataset("heldout").item(1)["caption"] == "a tiny green cross in the upper left"


def test_colourless_captions_drop_colours_keep_shapes_and_use_only_training_words():
    import random
    import re

    from cvformers.data.shapes import _COLOUR_WORDS, _SHAPE_WORDS, colourless_caption

    data = ShapesDataset("train", size=300)
    words = {w for c in data.captions() for w in c.split()}
    colour_words = {w for ws in _COLOUR_WORDS.values() for w in ws}
    dropped_one = dropped_all = 0
    for i in range(len(data)):
        record = data.record(i)
        text = colourless_caption(record, random.Random(i))
        assert text == colourless_caption(record, random.Random(i))  # seeded
        assert set(text.split()) <= words, text  # nothing the BPE was not trained on
        named = [w for w in text.split() if w in colour_words]
        kept = {o["colour"] for o in record["objects"] if any(w in _COLOUR_WORDS[o["colour"]] for w in named)}
        assert len(named) == len(kept) < len(record["objects"]), text  # at least one colour left out
        dropped_all += not named
        dropped_one += bool(named)
        for obj in record["objects"]:  # every object is still named by one of its shape's words
            assert re.search("|".join(_SHAPE_WORDS[obj["shape"]]), text), text
    assert dropped_all > 100 and dropped_one > 30


def _small_single(shape: str, colour: str = "red") -> dict:
    import random

    from cvformers.data.shapes import _place

    obj = {"colour": colour, "shape": shape, "size": "small", "position": "center", "position_stated": True}
    _place(obj, 1, 1, 32, random.Random(0), jitter=0)
    return {"objects": [obj], "relation": None, "image_size": 32}


def test_checker_keeps_desaturated_edges_of_a_shape_and_drops_lone_off_palette_pixels():
    from cvformers.eval.fidelity import classify_pixels

    for shape in SHAPES:
        rec = _small_single(shape)
        img = render(rec)
        inside = img.sum(0) > 0
        left_edge = inside & ~torch.roll(inside, 1, dims=1)  # shape pixels with background on their left
        pink = torch.tensor([195, 80, 65]) / 255  # a tokenizer's pale rim: off every palette ray
        img[:, left_edge] = pink[:, None]
        labels = classify_pixels(img)
        rim_is_red = labels[left_edge.numpy()] == COLOURS.index("red")
        assert rim_is_red.mean() >= 0.75, shape  # a rim pixel needs three confident red neighbours
        assert check_image(img, rec)["all_correct"], shape
    lone = torch.zeros(3, 32, 32)
    lone[:, 5, 5] = torch.tensor([195, 80, 65]) / 255
    assert (classify_pixels(lone) == -1).all()


@pytest.mark.parametrize("sigma", [0.7, 1.0, 1.3])
def test_checker_reads_blurred_small_shapes_and_still_rejects_wrong_ones(sigma):
    for shape in SHAPES:
        rec = _small_single(shape)
        img = gaussian_blur(render(rec)[None], sigma)[0].clamp(0, 1)
        assert check_image(img, rec)["all_correct"], (shape, sigma)
        for other in SHAPES:
            if other != shape:
                wrong = copy.deepcopy(rec)
                wrong["objects"][0]["shape"] = other
                assert not check_image(img, wrong)["all_correct"], (shape, other, sigma)


def test_paraphrases_say_the_same_scene_and_keep_scenes_and_heldout_pairs():
    import random

    from cvformers.data.shapes import PARAPHRASE_FORMS, paraphrase_caption, parse_caption

    plain, reworded = ShapesDataset("train", size=400), ShapesDataset("train", size=400, paraphrase=1.0)
    forms_seen = set()
    for i in range(len(plain)):
        a, b = plain[i], reworded[i]
        assert torch.equal(a["image"], b["image"])  # the wording changes, never the scene
        assert b["caption"] != a["caption"]
        stated = parse_caption(b["caption"])  # the checker reads it back as the same scene
        assert check_image(b["image"], stated)["all_correct"], b["caption"]
        assert not {(o["colour"], o["shape"]) for o in stated["objects"]} & HELDOUT_PAIRS
        words = b["caption"].split()
        forms_seen.update(f for f, hit in (("no articles", not {"a", "an", "the"} & set(words)),
                                           ("is", "is" in words and words[0] != "there"),
                                           ("there is", words[:2] == ["there", "is"]),
                                           ("with it", words[-1] == "it")) if hit)
    assert forms_seen == set(PARAPHRASE_FORMS) - {"the"}
    # the relation said from the other object: "a blue square with a red circle above it"
    record = parse_caption("a red circle above a blue square")
    text = paraphrase_caption(record, random.Random(0), form="with it")
    assert text.endswith(" it") and parse_caption(text)["objects"][0]["position"] in ("top", "bottom")
    assert {o["colour"]: o["position"] for o in parse_caption(text)["objects"]} == {"red": "top", "blue": "bottom"}
    # the scenes and template captions are those of paraphrase = 0; a share of 0.5 rewords about half
    half = ShapesDataset("train", size=400, paraphrase=0.5)
    assert ShapesDataset("train").item(0)["caption"] == plain.item(0)["caption"]
    changed = sum(half.item(i)["caption"] != plain.item(i)["caption"] for i in range(400))
    assert 150 < changed < 250
    before = [half.caption(i) for i in range(50)]
    half.set_epoch(1)  # other epochs, other wordings of the same items
    assert [half.caption(i) for i in range(50)] != before
    with pytest.raises(UserError, match="paraphrase"):
        ShapesDataset("train", paraphrase=1.5)


def test_everyday_wordings_parse():
    from cvformers.data.shapes import parse_caption

    for text in ("red circle above blue square", "the red circle is above the blue square",
                 "there is a red circle above a blue square", "a blue square with a red circle above it"):
        rec = parse_caption(text)
        assert {o["colour"]: o["position"] for o in rec["objects"]} == {"red": "top", "blue": "bottom"}, text
    assert parse_caption("the small red circle is on the left")["objects"][0]["position"] == "left"
