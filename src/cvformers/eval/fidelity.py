"""Caption fidelity on ``shapes``: does an image show what its record (caption) says?

Built for imperfect pictures — dVAE reconstructions and DALL-E samples are blurry and their
colours drift — so every step tolerates a little of both:

1. each pixel goes to the nearest palette colour, or to the background when it is nearer
   to black or farther than ``COLOUR_TOLERANCE`` (RGB units) from every palette colour; a
   bright pixel off every colour (a decoder's pale rim) joins the colour its neighbours agree on;
2. pixels of one colour are grouped into 8-connected components; the largest component of
   an object's colour is that object (scenes never repeat a colour);
3. shape: the component's bounding-box crop, pooled to an 8×8 occupancy grid, is matched to
   the nearest template of the four shapes rendered at several sides, sharp and blurred (corners,
   fill and symmetry all show up in that grid: a triangle's empty top corners, a plus's four; the
   blurred templates are a 9-pixel triangle with its base corners rounded off by a decoder);
4. position: for a stated slot, the component centroid's nearest slot column and row; for a
   relation ("A above B"), the centroids must be ordered along that axis by a clear margin.

``all_correct`` also requires that nothing else sizeable was drawn (no extra objects).
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from cvformers.data.shapes import COLOURS, PALETTE, POSITIONS, SHAPES, object_sizes, shape_mask, slot_centers
from cvformers.errors import UserError

COLOUR_TOLERANCE = 45.0  # max RGB distance (0..255 scale) from a palette colour's ray through black
GRID = 8  # side of the occupancy grid a shape is compared on
UNSURE_MIN_VOTES = 2  # neighbours of one colour (and none of another) that an off-palette pixel joins
SHAPE_TOLERANCE = 0.3
TEMPLATE_BLURS = (0.0, 0.8, 1.2)  # Gaussian σ (px) of the template variants a shape is matched against  # max mean |occupancy - template| for any shape to be recognised

_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)  # [8, 3]


def classify_pixels(image: torch.Tensor) -> np.ndarray:
    """[3,H,W] in [0,1] -> int array [H,W]: palette index (COLOURS order) or -1 for background.

    A blurred edge pixel is a mix of a colour and black, i.e. it lies on the ray from black
    to that colour. So each pixel is projected onto every palette ray: it belongs to the
    colour whose ray is nearest, when it is at least half as bright as that colour (the
    half-intensity contour is where the sharp edge was) and within ``COLOUR_TOLERANCE``
    of the ray. A bright pixel farther off every ray is unsure: it takes the one colour its
    confident neighbours have (at least two, none of another colour), and stays background alone.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise UserError(f"fidelity checker wants an RGB image [3,H,W], got shape {tuple(image.shape)}")
    rgb = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0  # [H,W,3]
    alpha = (rgb @ _PALETTE_ARRAY.T) / (_PALETTE_ARRAY**2).sum(-1)  # [H,W,8] brightness along each ray
    alpha = np.clip(alpha, 0.0, 1.25)
    residual = np.linalg.norm(rgb[:, :, None, :] - alpha[..., None] * _PALETTE_ARRAY, axis=-1)
    nearest = residual.argmin(-1)
    best_alpha = np.take_along_axis(alpha, nearest[..., None], -1)[..., 0]
    bright = best_alpha >= 0.5
    ok = bright & (residual.min(-1) <= COLOUR_TOLERANCE)
    labels = np.where(ok, nearest, -1)
    # A bright pixel off every ray (a tokenizer's pale rim, e.g. pink on a red shape) takes the
    # colour of its 8-neighbours when at least two of them have it and none has another colour.
    # Two passes, so a rim two pixels thick is taken in from the inside out.
    h, w = labels.shape
    for _ in range(2):
        unsure = bright & (labels < 0)
        if not unsure.any():
            break
        padded = np.pad(labels, 1, constant_values=-1)
        votes = np.zeros((h, w, len(COLOURS)), dtype=np.int32)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                if dy != 1 or dx != 1:
                    nb = padded[dy:dy + h, dx:dx + w]
                    votes += nb[..., None] == np.arange(len(COLOURS))
        winner, count = votes.argmax(-1), votes.max(-1)
        agreed = (count >= UNSURE_MIN_VOTES) & ((votes > 0).sum(-1) == 1)
        labels = np.where(unsure & agreed, winner, labels)
    return labels


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as arrays of (y, x) pixel coordinates."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        out.append(np.array(pixels))
    return out


def _occupancy(crop: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(crop.astype(np.float32))[None, None]
    # upsample first so area pooling is well defined for crops smaller than the grid
    t = F.interpolate(t, size=(GRID * 4, GRID * 4), mode="nearest")
    return F.adaptive_avg_pool2d(t, GRID)[0, 0]


@lru_cache(maxsize=8)
def _templates(image_size: int) -> tuple[list[str], torch.Tensor]:
    sizes = object_sizes(image_size)
    sides = sorted({sizes["small"], sizes["large"], (sizes["small"] + sizes["large"]) // 2 | 1,
                    max(5, sizes["small"] - 2), sizes["large"] + 2})
    names, grids = [], []
    for shape in SHAPES:
        for side in sides:
            sharp = shape_mask(shape, side)
            for sigma in TEMPLATE_BLURS:  # also as a blurry decoder draws it: corners rounded off
                mask = sharp if sigma == 0 else _blurred_mask(sharp, sigma)
                names.append(shape)
                grids.append(_occupancy(mask))
    return names, torch.stack(grids)


def _blurred_mask(mask: np.ndarray, sigma: float) -> np.ndarray:
    """The mask blurred by a Gaussian and cut again at half intensity, cropped to what is left."""
    pad = max(1, int(3 * sigma + 0.5))
    t = torch.from_numpy(np.pad(mask, pad).astype(np.float32))[None, None]
    soft = gaussian_blur(t, sigma)[0, 0].numpy() >= 0.5
    ys, xs = np.nonzero(soft)
    return soft[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def classify_shape(pixels: np.ndarray, image_size: int) -> tuple[str | None, float]:
    """Nearest shape template for one component; (None, distance) when nothing is close."""
    ys, xs = pixels[:, 0], pixels[:, 1]
    y0, x0 = ys.min(), xs.min()
    crop = np.zeros((ys.max() - y0 + 1, xs.max() - x0 + 1), dtype=bool)
    crop[ys - y0, xs - x0] = True
    names, grids = _templates(image_size)
    d = (grids - _occupancy(crop)).abs().mean(dim=(1, 2))
    best = int(d.argmin())
    dist = float(d[best])
    return (names[best] if dist <= SHAPE_TOLERANCE else None), dist


def _nearest_slot(value: float, lines) -> int:
    return int(np.argmin([abs(value - v) for v in lines]))


def check_image(image: torch.Tensor, record: dict) -> dict:
    """Score one image against one shapes record.

    Returns ``{"objects": [{"colour_ok", "shape_ok", "position_ok", "size_ok", "shape",
    "centroid"}...], "extra_objects": int, "all_correct": bool}``. ``size_ok`` is reported
    but not part of ``all_correct`` (captions may leave sizes open).
    """
    size = image.shape[-1]
    labels = classify_pixels(image)
    sizes = object_sizes(size)
    min_area = max(4, int(0.3 * sizes["small"] ** 2))  # well below the smallest clean shape
    comps = {}
    for ci, colour in enumerate(COLOURS):
        mask = labels == ci
        if mask.sum() >= min_area:
            comps[colour] = sorted((c for c in components(mask) if len(c) >= min_area), key=len, reverse=True)
    results, centroids = [], []
    used = 0
    for obj in record["objects"]:
        found = comps.get(obj["colour"], [])
        res = {"colour_ok": bool(found), "shape_ok": False, "position_ok": False, "size_ok": False,
               "shape": None, "centroid": None}
        if found:
            pix = found[0]
            used += 1
            cy, cx = pix[:, 0].mean() + 0.5, pix[:, 1].mean() + 0.5  # pixel centres
            res["centroid"] = [float(cx), float(cy)]
            res["shape"], _ = classify_shape(pix, size)
            res["shape_ok"] = res["shape"] == obj["shape"]
            side = max(np.ptp(pix[:, 0]), np.ptp(pix[:, 1])) + 1
            res["size_ok"] = min(sizes, key=lambda k: abs(sizes[k] - side)) == obj["size"]
            if record.get("relation") is None:
                if obj.get("position_stated", True):
                    lines = [v + 0.5 for v in slot_centers(size)]
                    col, row = POSITIONS[obj["position"]]
                    res["position_ok"] = _nearest_slot(cx, lines) == col and _nearest_slot(cy, lines) == row
                else:
                    res["position_ok"] = True  # caption left the position open
        results.append(res)
        centroids.append(res["centroid"])
    if record.get("relation") is not None and all(c is not None for c in centroids):
        (ax, ay), (bx, by) = centroids
        margin = size / 8
        ok = {"above": by - ay > margin, "below": ay - by > margin,
              "left of": bx - ax > margin, "right of": ax - bx > margin}[record["relation"]]
        for res in results:
            res["position_ok"] = bool(ok)
    extra = sum(len(v) for v in comps.values()) - used
    all_ok = all(r["colour_ok"] and r["shape_ok"] and r["position_ok"] for r in results) and extra == 0
    return {"objects": results, "extra_objects": int(extra), "all_correct": bool(all_ok)}


def fidelity_report(images: torch.Tensor, records: list[dict]) -> dict[str, float]:
    """Rates over a batch: all_correct (the fidelity), and per-object colour/shape/position/size."""
    if len(images) != len(records):
        raise UserError(f"{len(images)} images but {len(records)} records")
    if len(records) == 0:
        raise UserError("fidelity of an empty batch")
    return summarise_checks([check_image(img, rec) for img, rec in zip(images, records)])


def summarise_checks(checks: list[dict]) -> dict[str, float]:
    """``fidelity_report`` of images already checked (``check_image`` results)."""
    if not checks:
        raise UserError("fidelity of an empty batch")
    objs = [o for c in checks for o in c["objects"]]
    rate = lambda key: sum(o[key] for o in objs) / max(1, len(objs))  # noqa: E731
    return {
        "fidelity": sum(c["all_correct"] for c in checks) / len(checks),
        "colour": rate("colour_ok"), "shape": rate("shape_ok"),
        "position": rate("position_ok"), "size": rate("size_ok"),
        "extra_objects": sum(c["extra_objects"] > 0 for c in checks) / len(checks),
    }


def verdict(check: dict, record: dict) -> str:
    """What ``check_image`` found wrong, in words: "blue square drawn as a circle; 1 extra object"
    ("right" when nothing was)."""
    wrong = []
    relation = record.get("relation")
    for obj, res in zip(record["objects"], check["objects"]):
        name = f"{obj['colour']} {obj['shape']}"
        if not res["colour_ok"]:
            wrong.append(f"no {obj['colour']} object")
            continue
        if not res["shape_ok"]:
            wrong.append(f"{name} drawn as {'a ' + res['shape'] if res['shape'] else 'no known shape'}")
        if not res["position_ok"] and relation is None:
            wrong.append(f"{name} not at {obj['position']}")
    found = [res["colour_ok"] for res in check["objects"]]
    if relation is not None and all(found) and not all(res["position_ok"] for res in check["objects"]):
        first, second = record["objects"][:2]
        wrong.append(f"{first['colour']} not {relation} {second['colour']}")
    if check["extra_objects"]:
        wrong.append(f"{check['extra_objects']} extra object{'s' if check['extra_objects'] > 1 else ''}")
    return "; ".join(wrong) or "right"


def fidelity(images: torch.Tensor, records: list[dict]) -> float:
    """Share of images whose every object has the right colour, shape and position (and no extras)."""
    return fidelity_report(images, records)["fidelity"]


# --- validation of the checker itself (python -m cvformers.eval.fidelity) ------------------
def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B,C,H,W] (radius 3σ, edges replicated)."""
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=images.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = images.shape[1]
    x = F.pad(images, (radius,) * 4, mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def validate_checker(n: int = 1000, image_size: int = 32, split: str = "train", seed: int = 0) -> dict[str, float]:
    """Fidelity the checker gives to: exact renders (want ~1), blurred + noisy + colour-drifted
    renders (want high), uniform noise and other scenes' captions (want ~0)."""
    from cvformers.data import build_dataset, collate

    ds = build_dataset("shapes", split, image_size=image_size, size=n, seed=seed)
    batch = collate([ds[i] for i in range(n)])
    images, records = batch["image"], batch["record"]
    g = torch.Generator().manual_seed(seed)
    out = {"ground_truth": fidelity(images, records)}
    for sigma, noise in [(0.7, 0.03), (1.0, 0.05), (1.3, 0.05)]:
        x = gaussian_blur(images, sigma) + noise * torch.randn(images.shape, generator=g)
        x = x * (1 + 0.08 * (2 * torch.rand(len(x), 3, 1, 1, generator=g) - 1))  # ±8% colour drift
        out[f"blur{sigma}_noise{noise}"] = fidelity(x.clamp(0, 1), records)
    out["uniform_noise"] = fidelity(torch.rand(images.shape, generator=g), records)
    # each image against the next scene's record, unless both describe the same colour-shape pairs
    same = lambda a, b: sorted((o["colour"], o["shape"]) for o in a["objects"]) == sorted(  # noqa: E731
        (o["colour"], o["shape"]) for o in b["objects"])
    keep = [i for i in range(n) if not same(records[i], records[(i + 1) % n])]
    out["wrong_captions"] = fidelity(images[keep], [records[(i + 1) % n] for i in keep])
    # each image against its own record with one attribute of one object changed: the checker
    # must notice a single wrong shape or colour, also through blur (want ~0)
    blurred = gaussian_blur(images, 1.0).clamp(0, 1)
    for attribute, values in (("shape", SHAPES), ("colour", COLOURS)):
        altered = [alter_record(rec, attribute, values, i) for i, rec in enumerate(records)]
        out[f"one_wrong_{attribute}"] = fidelity(images, altered)
        out[f"one_wrong_{attribute}_blur1.0"] = fidelity(blurred, altered)
    return out


def alter_record(record: dict, attribute: str, values: tuple[str, ...], index: int) -> dict:
    """A copy of ``record`` whose object ``index % len`` has another ``attribute`` value, one not
    used by the scene's other objects (so the altered caption is never true of the image)."""
    objects = [dict(o) for o in record["objects"]]
    target = objects[index % len(objects)]
    taken = {o[attribute] for o in objects}
    choices = [v for v in values if v not in taken]
    target[attribute] = choices[index % len(choices)]
    return {**record, "objects": objects}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="validate the shapes caption-fidelity checker")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--split", default="train")
    a = ap.parse_args()
    for key, value in validate_checker(a.n, a.image_size, a.split).items():
        print(f"{a.split} {a.image_size}px n={a.n} {key}: {100 * value:.1f}%")
