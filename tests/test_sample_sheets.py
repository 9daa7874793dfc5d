"""Sample sheets with words: captions and class names drawn beside/under the pictures."""

import torch
from PIL import Image

from cvformers.images import label_font, labelled_grid, picture, pil_to_tensor, wrap_text

torch.set_num_threads(1)


def _ink(region: torch.Tensor) -> int:
    """Pixels of a white region that are not white: the text drawn there."""
    return int((region < 0.5).any(0).sum())


def test_row_and_tile_labels_add_written_strips():
    images = torch.rand(6, 3, 16, 16)
    bare = picture(images, 32, nrow=3)
    rows = labelled_grid(images, 3, min_tile=32, row_labels=["a red circle", "a big blue square"], label_width=100)
    assert rows.shape[1] == bare.shape[1] and rows.shape[2] > bare.shape[2]
    assert _ink(rows[:, :, :100]) > 20  # the caption column holds text
    # the images themselves are untouched (up to 8-bit rounding)
    assert (rows[:, :, -bare.shape[2]:][:, 2:34, 2:34] - bare[:, 2:34, 2:34]).abs().max() <= 1 / 255
    unlabelled = labelled_grid(images, 3, min_tile=32, row_labels=["", ""], label_width=100)
    assert _ink(unlabelled[:, :, :100]) == 0

    tiles = labelled_grid(images, 3, min_tile=32, tile_labels=[""] * 3 + ["shape wrong: square"] * 3)
    assert tiles.shape[2] == bare.shape[2] and tiles.shape[1] > bare.shape[1]
    strip = tiles[:, -(tiles.shape[1] - bare.shape[1]) - 2:, :]
    assert _ink(strip) > 20
    assert _ink(tiles[:, 34:36, :]) == 0  # the first row has no labels, so no strip under it
    grey = labelled_grid(torch.rand(2, 1, 8, 8), 2, row_labels=["seven"])
    assert grey.shape[0] == 3


def test_long_captions_wrap_to_the_width():
    font = label_font()
    lines = wrap_text("a small red circle above a large blue square", 60, font)
    assert len(lines) > 2 and " ".join(lines) == "a small red circle above a large blue square"
    assert all(font.getlength(line) <= 60 for line in lines if " " in line)


def test_ddpm_sheet_names_each_class_row(tmp_path):
    from cvformers.tasks.ddpm import DDPMTaskConfig, sample_writer
    from tests.test_diffusion import tiny_model

    model = tiny_model(num_classes=3)
    names = ["T-shirt/top", "Trouser", "Pullover"]
    sample_writer(DDPMTaskConfig(sample_steps=2), None, per_row=2, names=names)(model, tmp_path, 1)
    sheet = Image.open(tmp_path / "samples.png")
    tile = 16 * 4  # 16-px samples enlarged to 64 px
    assert sheet.size[0] > 2 * tile + 100 - 1 and sheet.size[1] >= 3 * tile
    column = pil_to_tensor(sheet.convert("L").crop((0, 0, 100, sheet.size[1])))[0]
    rows_with_ink = [(column[r * (tile + 2):(r + 1) * (tile + 2)] < 0.5).sum().item() for r in range(3)]
    assert all(n > 10 for n in rows_with_ink)  # a name beside each row


def test_dalle_sheet_writes_the_prompts(tmp_path):
    from cvformers.pipelines.text_to_image import TextToImage
    from cvformers.tasks.dalle import sample_writer

    pipe = TextToImage.load("default")
    prompts = ["a red circle", "a big blue square above a green plus"]
    sample_writer(pipe.vae, pipe.tokenizer, prompts, per_prompt=2)(pipe.model, tmp_path, 1)
    sheet = pil_to_tensor(Image.open(tmp_path / "samples.png").convert("L"))[0]
    height, width = sheet.shape
    side = pipe.image_size * max(1, -(-64 // pipe.image_size))
    assert width > 2 * side + 160 - 1 and height >= 2 * side
    assert (sheet[:, :160] < 0.5).sum() > 40  # the prompts, beside their rows
