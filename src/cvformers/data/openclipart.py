"""Build an image–caption folder from data a package manager installed: OpenClipart + emoji.

    cvformers data openclipart --out data/openclipart [--image-size 64]

Sources (Debian/Ubuntu: ``apt-get install openclipart-png openclipart-svg fonts-noto-color-emoji``):

* ``/usr/share/openclipart/png/**.png`` — public-domain clip art; each picture's caption
  comes from the SVG at the same relative path under ``/usr/share/openclipart/svg/``: the
  work's ``<dc:title>`` and its keywords (``<dc:subject>`` … ``<rdf:li>``);
* the SVG itself, drawn by librsvg's ``rsvg-convert`` (``apt-get install librsvg2-bin``) at 4x
  ``image_size``, where the PNG is unreadable, blank, too large to decode, or its content is
  smaller than ``image_size`` (a 48 px icon would be blown up blurred);
* ``NotoColorEmoji.ttf`` — the colour bitmaps (CBDT table, read with ``fontTools``) of every
  single-code-point emoji, captioned with its Unicode name ("grinning face").

Every picture is composited onto white, trimmed to its content, padded to a square with
white and resized to ``image_size``; the result is written as ``NAME.png`` + ``NAME.txt``
(several caption lines; ``FolderDataset`` picks one per epoch). Duplicates are dropped twice:
identical pixels after resizing (same art in several categories or sizes) and identical
caption text (one picture per distinct description).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import shutil
import unicodedata
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cvformers.errors import UserError
from cvformers.utils import progress

log = logging.getLogger("cvformers.data")

PNG_ROOT = Path("/usr/share/openclipart/png")
SVG_ROOT = Path("/usr/share/openclipart/svg")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
_NS = {"dc": "http://purl.org/dc/elements/1.1/", "cc": "http://web.resource.org/cc/",
       "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#"}
MAX_PIXELS = 30_000_000  # skip larger PNGs (checked from the header, before decoding)
COLLECTION_SIZE = 5  # a title shared by this many files names a collection, not a picture
# keywords that say nothing about the picture
_STOP_KEYWORDS = {"unsorted", "clip art", "clipart", "image", "media", "public domain", "png", "svg",
                  "openclipart", "externalsource", "remix", "sketch", "drawing", "colour", "color",
                  "coloring book", "line art", "icon", "icons", "cartoon", "hash", "magick", "theme",
                  "lemon theme icon", "mapsym", "appicon", "special", "webpage", "action", "application"}


@dataclass
class BuildStats:
    """What the builder did; printed by the CLI."""

    written: int = 0
    clipart: int = 0
    emoji: int = 0
    no_caption: int = 0  # SVG missing or without a usable title
    foreign_titles: int = 0  # Italian or French titles: the keywords caption the picture instead
    collection_titles: int = 0  # a collection's name as title ("Lemon SVG theme"): the file name used instead
    unreadable: int = 0  # PNG that PIL could not decode, or blank
    svg_rendered: int = 0  # pictures drawn from the SVG: PNG unusable, or its content smaller than image_size
    small_png: int = 0  # PNG content smaller than image_size kept because the SVG could not be drawn
    too_large: int = 0  # PNG above MAX_PIXELS
    duplicate_image: int = 0
    duplicate_caption: int = 0
    out: str = ""
    notes: list[str] = field(default_factory=list)


def _clean(text: str) -> str:
    text = text.replace("_", " ")
    return " ".join(text.split()).strip(" .,;:-")


# Residue in OpenClipart titles and keywords that says nothing about the picture
_TIMESTAMP = re.compile(r"\(?\b(?:mon|tue|wed|thu|fri|sat|sun)[a-z]* [a-z]{3} \d{1,2} \d\d:\d\d(?::\d\d)? \d{4}\)?", re.I)
_COLLECTION = re.compile(r"^part of the .* collection$", re.I)  # "Part of the Flat Icon Collection"
_YEAR = re.compile(r",?\s*\b(?:19[89]\d|20[0-2]\d)\b")
_CREDIT = re.compile(r"\s+by\s+[A-Z][\w.]*(?:\s+[A-Z][\w.]*)*\s*$")  # "... by Alan Horkan"
_GLUED_DIGITS = re.compile(r"\b([A-Za-z]{2,})\d+\b")  # "guitar1", "Aircraft3", "smiley111"
_SERIAL = re.compile(r"(?<![\w(])(?:0\d+|\d{3,})(?![\w)])")  # "book 01", "BlueMan 211"; "45 RPM" stays
_HASH = re.compile(r"\bhash\(0x[0-9a-f]+\)", re.I)  # keyword residue: "hash(0x869b4d8)"
# Function words of the Italian and French titles in the collection ("Gallo di profilo", "ne pas
# toucher"): a title holding one is not English, and its keywords ("bird") describe it instead.
_FOREIGN_WORDS = frozenset("di del della dei delle degli il lo gli e con da per una uno mie miei "
                           "de du des le la les et pas avec pour sur aux".split())
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z][a-z])")  # "RoundPointShovel" -> "Round Point Shovel"


def clean_title(text: str) -> str:
    """A title or keyword as a caption: timestamps, years, credits, serial numbers and digits
    stuck to words dropped, camel case and ``_ - #`` turned into spaces. Empty when nothing
    that reads as words is left ("Part of the Flat Icon Collection (Wed Aug 25 23:23:49 2004)").

    "pantyhose10" -> "pantyhose"; "BlueMan#211" -> "Blue Man"; "RoundPointShovel" -> "Round
    Point Shovel"; "Ice Cream Cone (1 scoop)" stays.
    """
    text = _HASH.sub(" ", _TIMESTAMP.sub(" ", text))
    text = _CREDIT.sub("", _YEAR.sub("", text))
    text = _CAMEL.sub(" ", re.sub(r"[_#]|(?<=\w)-(?=\w)", " ", text))
    text = _SERIAL.sub(" ", _GLUED_DIGITS.sub(r"\1", text))
    text = re.sub(r"\(\s*\)", " ", text)
    text = _clean(text)
    if _COLLECTION.match(text) or not re.search(r"[A-Za-z]{2}", text):
        return ""
    return text


def svg_caption(svg_path: Path) -> tuple[str, list[str]] | None:
    """(title, keywords) of an OpenClipart SVG's metadata, or None when it has no title.

    The metadata block comes first in these files, so parsing stops at ``</metadata>``.
    Only the ``cc:Work``'s own ``dc:title`` counts (publisher/creator agents have titles too).
    """
    title, keywords, people = None, [], []
    try:
        for _, elem in ET.iterparse(svg_path, events=("end",)):
            tag = elem.tag
            if tag == f"{{{_NS['cc']}}}Work":
                t = elem.find("dc:title", _NS)
                title = t.text if t is not None else None
                keywords = [li.text or "" for li in elem.iterfind("dc:subject/rdf:Bag/rdf:li", _NS)]
                people = [a.text or "" for a in elem.iterfind("*/cc:Agent/dc:title", _NS)]
                break
            if tag.endswith("}metadata"):
                break
    except (ET.ParseError, OSError, UnicodeDecodeError):
        # fall back to text search on a malformed file
        try:
            text = svg_path.read_text(encoding="utf-8", errors="replace")[:200_000]
        except OSError:
            return None
        work = re.search(r"<cc:Work.*?(?:</cc:Work>|\Z)", text, re.S)  # a cut-off file has no end tag
        if work is None:
            return None
        people = re.findall(r"<cc:Agent.*?<dc:title>(.*?)</dc:title>", work.group(0), re.S)
        body = re.sub(r"<cc:Agent.*?</cc:Agent>", "", work.group(0), flags=re.S)
        m = re.search(r"<dc:title>(.*?)</dc:title>", body, re.S)
        title = m.group(1) if m else None
        keywords = re.findall(r"<rdf:li>(.*?)</rdf:li>", body, re.S)
    # authors' names are not descriptions: they turn up as titles and keywords
    people = {_clean(p).lower() for p in people} | {"open clip art library"}
    # "Clipart by Nicu Buculei - bee" -> "bee"
    title = re.sub(r"^\s*clip\s*art\s+by\s+[^-]+-\s*", "", _clean(title or ""), flags=re.I)
    raw_title, title = title, clean_title(title)
    seen, kws = {title.lower()} | people, []
    for k in keywords:
        k = clean_title(_clean(k)).lower()
        if k and k not in seen and k not in _STOP_KEYWORDS and len(k) < 40:
            seen.add(k)
            kws.append(k)
    if _is_name(title, people):  # "C Rollandin Francesco" by Architetto Francesco Rollandin: the keywords say more
        return (kws[0], kws[1:]) if kws else None
    if not (title or _COLLECTION.match(_TIMESTAMP.sub("", raw_title).strip())):
        return None  # no title; a collection's marker leaves "" (the file name says more)
    return title, kws


def _is_name(title: str, people: set[str]) -> bool:
    """Whether a title is an author's name, whole or in part ("C Rollandin Francesco")."""
    words = {w for w in re.findall(r"[a-z]+", title.lower()) if len(w) > 1}
    names = {w for p in people for w in re.findall(r"[a-z]+", p)}
    return bool(title) and (title.lower() in people or (len(words) >= 2 and words <= names))


def is_foreign(title: str) -> bool:
    """Whether a title reads as Italian or French (it holds one of their function words)."""
    return any(word in _FOREIGN_WORDS for word in re.findall(r"[a-z]+", title.lower()))


def stem_title(stem: str) -> str:
    """A title from a file name: "folder_binary" -> "folder binary", "home13" -> "home"."""
    words = [re.sub(r"\d+$", "", w) for w in re.split(r"[_\-\s.]+", stem)]
    words = [w for w in words if len(w) > 1 and not re.search(r"\d", w)]
    return " ".join(words)


def clipart_captions(title: str, keywords: list[str]) -> list[str]:
    """Caption lines for one picture: the title alone, as clip art, and with its keywords."""
    lines = [title, f"clip art of {title}"]
    if keywords:
        lines.append(f"{title}: {', '.join(keywords[:5])}")
    return lines


def with_article(noun_phrase: str) -> str:
    """"a heart", "an apple", "heart hands" (a plural takes none), "the moon" (one is there)."""
    words = noun_phrase.split()
    if not words or words[0] in ("a", "an", "the") or (words[-1].endswith("s") and not words[-1].endswith("ss")):
        return noun_phrase
    return ("an " if words[0][0] in "aeiou" else "a ") + noun_phrase


def emoji_captions(name: str) -> list[str]:
    return [name, f"an emoji of {with_article(name)}", f"{name} emoji"]


def trimmed_on_white(im):
    """RGB(A) PIL image -> its content composited onto white and trimmed to its bounding box
    (RGB), or None for a blank picture."""
    from PIL import Image, ImageChops

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    im = im.convert("RGB")
    # bounding box of everything that is not (nearly) white
    diff = ImageChops.difference(im, Image.new("RGB", im.size, (255, 255, 255))).convert("L")
    box = diff.point(lambda v: 255 if v > 8 else 0).getbbox()
    return None if box is None else im.crop(box)


def square_on_white(im, image_size: int, margin: float = 0.04):
    """RGB(A) PIL image -> white square ``image_size`` with the content trimmed and centred."""
    from PIL import Image

    im = trimmed_on_white(im)
    if im is None:
        return None  # a blank picture
    side = int(max(im.size) * (1 + 2 * margin)) + 1
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(im, ((side - im.size[0]) // 2, (side - im.size[1]) // 2))
    return canvas.resize((image_size, image_size), Image.Resampling.LANCZOS, reducing_gap=3.0)


RSVG = "rsvg-convert"  # librsvg's command line (Debian: librsvg2-bin)


def render_svg(svg_path: Path, width: int, timeout: float = 30.0):
    """The SVG drawn ``width`` px wide (aspect kept) by ``rsvg-convert``, as an RGBA PIL image, or
    None when the command is missing, fails or takes longer than ``timeout`` seconds."""
    import subprocess

    from PIL import Image

    exe = shutil.which(RSVG)
    if exe is None or not svg_path.is_file():
        return None
    try:
        done = subprocess.run([exe, "--width", str(width), "--keep-aspect-ratio", str(svg_path)],
                              capture_output=True, timeout=timeout, check=False)
    except (subprocess.TimeoutExpired, OSError):
        return None
    if done.returncode != 0 or not done.stdout:
        return None
    try:
        im = Image.open(io.BytesIO(done.stdout))
        im.load()
    except Exception:  # PIL raises many types for broken data
        return None
    return im


def iter_emoji(font_path: Path):
    """(unicode name, PIL image) for every single-code-point colour emoji bitmap in the font."""
    try:
        from fontTools.ttLib import TTFont
    except ImportError:
        raise UserError("reading emoji needs fontTools: pip install fonttools (or pass --no-emoji)") from None
    from PIL import Image

    font = TTFont(str(font_path), lazy=True)
    if "CBDT" not in font:
        raise UserError(f"{font_path} has no colour bitmaps (CBDT table)")
    strike = max(font["CBDT"].strikeData, key=len)
    for codepoint, glyph_name in sorted(font.getBestCmap().items()):
        glyph = strike.get(glyph_name)
        name = unicodedata.name(chr(codepoint), "")
        if glyph is None or not name or codepoint < 0x80:  # ASCII digits/#/* are keycap parts
            continue
        glyph.ensureDecompiled()
        data = getattr(glyph, "imageData", None)
        if not data:
            continue
        yield name.lower(), Image.open(io.BytesIO(data))


def build_openclipart(out: str | Path, image_size: int = 64, png_root: str | Path | None = None,
                      svg_root: str | Path | None = None, emoji_font: str | Path | None = EMOJI_FONT,
                      limit: int | None = None) -> BuildStats:
    """Write the caption folder to ``out``; see the module docstring. Roots default to the Debian
    install locations; ``emoji_font=None`` skips emoji."""
    from PIL import Image

    png_root, svg_root, out = Path(png_root or PNG_ROOT), Path(svg_root or SVG_ROOT), Path(out)
    if not png_root.is_dir():
        raise UserError(f"no OpenClipart PNGs at {png_root}: sudo apt-get install openclipart-png openclipart-svg")
    if not svg_root.is_dir():
        raise UserError(f"no OpenClipart SVGs at {svg_root} (captions come from them): "
                        "sudo apt-get install openclipart-svg")
    out.mkdir(parents=True, exist_ok=True)
    stats = BuildStats(out=str(out))
    image_hashes, caption_keys = set(), set()

    def emit(stem: str, image, captions: list[str]) -> bool:
        key = captions[-1].lower()  # the most specific line (title + keywords)
        if key in caption_keys:
            stats.duplicate_caption += 1
            return False
        digest = hashlib.sha1(image.tobytes()).hexdigest()
        if digest in image_hashes:
            stats.duplicate_image += 1
            return False
        caption_keys.add(key)
        image_hashes.add(digest)
        image.save(out / f"{stem}.png", optimize=True)
        (out / f"{stem}.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
        stats.written += 1
        return True

    pngs = sorted(png_root.rglob("*.png"))
    metas = {png: svg_caption(svg_root / png.relative_to(png_root).with_suffix(".svg"))
             for png in progress(pngs, desc="reading titles", unit="file")}
    # Icon sets and pattern collections give every file the set's name as its title
    # ("Lemon SVG theme", "Gramastar"); there the file name says what the picture is.
    title_counts = Counter(m[0].lower() for m in metas.values() if m is not None)
    for png in progress(pngs, desc="clip art", unit="file"):
        if limit is not None and stats.written >= limit:
            break
        rel = png.relative_to(png_root).with_suffix("")
        meta = metas[png]
        if meta is None:
            stats.no_caption += 1
            continue
        if (not meta[0] or title_counts[meta[0].lower()] >= COLLECTION_SIZE) and stem_title(png.stem):
            meta = (stem_title(png.stem), [meta[0].lower()] * bool(meta[0]) + meta[1])
            stats.collection_titles += 1
        elif not meta[0]:
            stats.no_caption += 1
            continue
        if is_foreign(meta[0]) and meta[1]:  # "Gallo di profilo" -> its keywords: "bird"
            meta = (meta[1][0], meta[1][1:])
            stats.foreign_titles += 1
        content = None  # the PNG's trimmed content, unless too large, unreadable or blank
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
                im = Image.open(png)
            with im:
                if im.size[0] * im.size[1] > MAX_PIXELS:  # a few posters would take GBs to decode
                    stats.too_large += 1
                else:
                    im.load()
                    content = trimmed_on_white(im)
                    if content is None:
                        stats.unreadable += 1
        except Image.DecompressionBombError:
            stats.too_large += 1
        except Exception:  # PIL raises many types for broken files
            stats.unreadable += 1
        if content is None or max(content.size) < image_size:
            # missing, too large or smaller than the output: draw the SVG at 4x the output instead
            drawn = render_svg(svg_root / png.relative_to(png_root).with_suffix(".svg"), 4 * image_size)
            drawn = trimmed_on_white(drawn) if drawn is not None else None
            if drawn is not None:
                content = drawn
                stats.svg_rendered += 1
            elif content is not None:
                stats.small_png += 1
        if content is None:
            continue
        square = square_on_white(content, image_size)
        stem = "clipart_" + "_".join(rel.parts)
        stats.clipart += emit(stem, square, clipart_captions(*meta))

    if emoji_font is not None:
        if not Path(emoji_font).is_file():
            stats.notes.append(f"no emoji font at {emoji_font} (apt-get install fonts-noto-color-emoji); skipped")
        else:
            for name, im in progress(iter_emoji(Path(emoji_font)), desc="emoji", unit="glyph"):
                if limit is not None and stats.written >= limit:
                    break
                square = square_on_white(im, image_size)
                if square is not None:
                    stats.emoji += emit("emoji_" + re.sub(r"[^a-z0-9]+", "_", name).strip("_"), square,
                                        emoji_captions(name))
    if stats.small_png and shutil.which(RSVG) is None:
        stats.notes.append(f"{stats.small_png} pictures kept from PNGs smaller than {image_size} px: "
                           f"install librsvg2-bin ({RSVG}) to draw them from their SVGs")
    if stats.written == 0:
        raise UserError(f"no captioned pictures found under {png_root}")
    log.info("openclipart folder %s: %s", out, stats)
    return stats
