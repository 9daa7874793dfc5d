"""OpenClipart caption-folder builder on a synthetic mini tree (never the real packages)."""

import shutil

import numpy as np
import pytest
from PIL import Image

from cvformers.cli import main
from cvformers.data.folder import FolderDataset
from cvformers.data.openclipart import build_openclipart, emoji_captions, svg_caption

SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/"
 xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<metadata><rdf:RDF><cc:Work rdf:about=""><dc:title>{title}</dc:title>
<dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
<dc:creator><cc:Agent><dc:title>Jane Artist</dc:title></cc:Agent></dc:creator>
</cc:Work></rdf:RDF></metadata><rect width="10" height="10"/></svg>
"""


def _art(root, rel, colour, title=None, keywords=(), size=(40, 30)):
    png = root / "png" / f"{rel}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGBA", size, (0, 0, 0, 0))  # transparent background
    im.paste(Image.new("RGBA", (10, 10), colour + (255,)), (5, 5))
    im.paste(Image.new("RGBA", (4, 4), colour + (255,)), (size[0] - 10, size[1] - 10))
    im.save(png)
    if title is not None:
        svg = root / "svg" / f"{rel}.svg"
        svg.parent.mkdir(parents=True, exist_ok=True)
        kws = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
        svg.write_text(SVG.format(title=title, keywords=kws))


def test_svg_caption_skips_authors_and_stopwords(tmp_path):
    _art(tmp_path, "animals/cat_01", (200, 0, 0), "Red_Cat", ["cat", "unsorted", "Jane Artist", "Animal"])
    assert svg_caption(tmp_path / "svg/animals/cat_01.svg") == ("Red Cat", ["cat", "animal"])
    _art(tmp_path, "x/by_author", (0, 0, 0), "Jane Artist")
    assert svg_caption(tmp_path / "svg/x/by_author.svg") is None
    (tmp_path / "broken.svg").write_text("<svg><metadata><cc:Work><dc:title>Half a boat</dc:title>")
    assert svg_caption(tmp_path / "broken.svg") == ("Half a boat", [])


def test_build_folder(tmp_path):
    src = tmp_path / "src"
    _art(src, "animals/cat_01", (200, 0, 0), "Red cat", ["cat", "animal"])
    _art(src, "animals/dog_01", (0, 0, 200), "Blue dog", ["dog"], size=(30, 60))
    _art(src, "other/cat_copy", (200, 0, 0), "Another title")  # same pixels as cat_01
    _art(src, "other/dog_02", (0, 200, 0), "Blue dog", ["dog"])  # same caption as dog_01
    _art(src, "other/untitled", (50, 50, 50))  # no SVG
    out = tmp_path / "out"
    stats = build_openclipart(out, image_size=16, png_root=src / "png", svg_root=src / "svg", emoji_font=None)
    assert (stats.written, stats.duplicate_image, stats.duplicate_caption, stats.no_caption) == (2, 1, 1, 1)
    cat = Image.open(out / "clipart_animals_cat_01.png")
    assert cat.size == (16, 16) and cat.mode == "RGB"
    assert min(cat.getpixel((0, 0)) + cat.getpixel((15, 0))) >= 250  # transparency -> white
    px = np.asarray(cat).astype(int)
    red = ((px[..., 0] > 150) & (px[..., 1] < 60) & (px[..., 2] < 60)).sum()
    assert red >= 20  # trimmed to the content and scaled up (untrimmed: a 4x4 patch)
    lines = (out / "clipart_animals_cat_01.txt").read_text().splitlines()
    assert lines == ["Red cat", "clip art of Red cat", "Red cat: cat, animal"]
    ds = FolderDataset(out, image_size=16)
    assert len(ds) == 2 and ds.skipped == 0


def test_cli_and_emoji_captions(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    _art(src, "a/one", (10, 100, 10), "Green thing")
    import cvformers.data.openclipart as oc

    monkeypatch.setattr(oc, "PNG_ROOT", src / "png")  # the builder reads its defaults at call time
    monkeypatch.setattr(oc, "SVG_ROOT", src / "svg")
    assert main(["data", "openclipart", "--out", str(tmp_path / "o"), "--image-size", "8", "--no-emoji"]) == 0
    assert "wrote 1 image-caption pairs" in capsys.readouterr().out
    assert emoji_captions("apple") == ["apple", "an emoji of an apple", "apple emoji"]


def test_real_titles_become_captions():
    from cvformers.data.openclipart import clean_title

    # titles and keywords as they are in Debian's openclipart-svg 0.18, and what a caption keeps
    expected = {
        "pantyhose10": "pantyhose",
        "Aircraft3": "Aircraft",
        "smiley111": "smiley",
        "BlueMan#211": "Blue Man",
        "RoundPointShovel": "Round Point Shovel",
        "arrow-up-green": "arrow up green",
        "book 01": "book",
        "kallisti-grenade 1": "kallisti grenade 1",
        "45 RPM Record": "45 RPM Record",
        "Ice Cream Cone (1 scoop)": "Ice Cream Cone (1 scoop)",
        "international maritime signal flag 0": "international maritime signal flag 0",
        "SVG Gradient Collection by Alan Horkan, 2004": "SVG Gradient Collection",
        "Part of the Flat Icon Collection (Wed Aug 25 23:31:12 2004)": "",
        "(wed aug 25 23:23:49 2004)": "",
        "France - Provence Alternate": "France - Provence Alternate",
        "hash(0x869b4d8)": "",
    }
    assert {title: clean_title(title) for title in expected} == expected
    assert emoji_captions("heart hands")[1] == "an emoji of heart hands"  # a plural takes no article
    assert emoji_captions("grinning face")[1] == "an emoji of a grinning face"


def test_a_collection_title_gives_way_to_the_file_name(tmp_path):
    src = tmp_path / "src"
    stamp = "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)"
    _art(src, "computer/folder_bomb", (200, 0, 0), stamp, ["filesystem", "computer"])
    _art(src, "computer/mail_post_to3", (0, 0, 200), stamp, ["computer"])
    _art(src, "music/guitar1", (0, 200, 0), "guitar1", ["music", "(wed aug 25 23:23:49 2004)"])
    _art(src, "birds/gallo", (200, 200, 0), "Gallo di profilo", ["bird", "hash(0x855e9e4)", "rooster"])
    out = tmp_path / "out"
    stats = build_openclipart(out, image_size=16, png_root=src / "png", svg_root=src / "svg", emoji_font=None)
    assert stats.written == 4 and stats.collection_titles == 2 and stats.foreign_titles == 1
    captions = {p.stem: p.read_text() for p in out.glob("*.txt")}
    assert captions["clipart_computer_folder_bomb"].splitlines()[0] == "folder bomb"
    assert captions["clipart_computer_mail_post_to3"].splitlines()[0] == "mail post to"
    assert captions["clipart_music_guitar1"].splitlines() == ["guitar", "clip art of guitar", "guitar: music"]
    assert captions["clipart_birds_gallo"].splitlines() == ["bird", "clip art of bird", "bird: rooster"]
    assert "2004" not in "".join(captions.values()) and "hash" not in "".join(captions.values())
    assert "2004" not in "".join(captions.values()) and "collection" not in "".join(captions.values()).lower()


def _svg_only(root, rel, title, body):
    svg = root / "svg" / f"{rel}.svg"
    svg.parent.mkdir(parents=True, exist_ok=True)
    svg.write_text(SVG.format(title=title, keywords="").replace('<rect width="10" height="10"/>', body))


@pytest.mark.skipif(shutil.which("rsvg-convert") is None, reason="needs librsvg2-bin (.ci/run installs it)")
def test_svg_drawn_where_the_png_is_broken_or_small(tmp_path):
    src = tmp_path / "src"
    _svg_only(src, "a/broken", "Green square", '<rect width="20" height="20" fill="#00c800"/>')
    (src / "png/a").mkdir(parents=True)
    (src / "png/a/broken.png").write_bytes(b"\x89PNG not really")
    _svg_only(src, "a/tiny", "Blue disc", '<circle cx="50" cy="50" r="40" fill="#0000c8"/>')
    Image.new("RGB", (6, 6), (0, 0, 200)).save(src / "png/a/tiny.png")  # 6 px: blown up it would be blocks
    out = tmp_path / "out"
    stats = build_openclipart(out, image_size=32, png_root=src / "png", svg_root=src / "svg", emoji_font=None)
    assert stats.written == 2 and stats.svg_rendered == 2 and stats.unreadable == 1
    green = np.asarray(Image.open(out / "clipart_a_broken.png")).astype(int)
    assert (green[..., 1] > 150).mean() > 0.8 and (green[..., 0] < 60).mean() > 0.8
    disc = np.asarray(Image.open(out / "clipart_a_tiny.png")).astype(int)
    # a disc drawn from its outline: white corners, blue centre (the 6 px PNG was a full square)
    assert disc[0, 0].min() >= 240 and disc[16, 16, 2] > 150 and disc[16, 16, 0] < 60


def test_without_rsvg_small_pngs_are_kept_and_said(tmp_path, monkeypatch):
    import cvformers.data.openclipart as oc

    monkeypatch.setattr(oc, "RSVG", "no-such-rsvg-convert")
    src = tmp_path / "src"
    _art(src, "a/small", (200, 0, 0), "Red thing", size=(20, 20))
    (src / "png/a/broken.png").write_bytes(b"not a png")
    _svg_only(src, "a/broken", "Green square", '<rect width="20" height="20" fill="#00c800"/>')
    stats = build_openclipart(tmp_path / "out", image_size=32, png_root=src / "png", svg_root=src / "svg",
                              emoji_font=None)
    assert stats.written == 1 and stats.svg_rendered == 0 and stats.small_png == 1 and stats.unreadable == 1
    assert any("librsvg2-bin" in note for note in stats.notes)


def test_a_title_made_of_the_authors_name_gives_way_to_the_keywords(tmp_path):
    svg = tmp_path / "bug.svg"
    svg.write_text(SVG.format(title="C Rollandin Francesco", keywords="<rdf:li>Architetto Francesco Rollandin</rdf:li>"
                              "<rdf:li>insect</rdf:li><rdf:li>ant</rdf:li>")
                   .replace("Jane Artist", "Architetto Francesco Rollandin"))
    assert svg_caption(svg) == ("insect", ["ant"])
    svg.write_text(SVG.format(title="Francesco", keywords="<rdf:li>insect</rdf:li>")
                   .replace("Jane Artist", "Architetto Francesco Rollandin"))
    assert svg_caption(svg) == ("Francesco", ["insect"])  # one shared word is not yet a name
