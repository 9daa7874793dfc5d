"""`cvformers train dalle`: cached dVAE ids, tokenizer, self-contained run folder, samples."""

import pytest
import torch
from PIL import Image

from cvformers.cli import main
from cvformers.config import save_toml, to_dict
from cvformers.errors import UserError
from cvformers.loading import load_vae
from cvformers.tasks import dalle as dalle_task
from cvformers.pipelines.text_to_image import TextToImage
from cvformers.loading import save_weights
from cvformers.tasks import TaskArgs, get_task
from cvformers.vae.dvae import DiscreteVAE, DVAEConfig

CONFIG = {
    "data": {"size": 48, "eval_size": 16},
    "model": {"dim": 32, "depth": 2, "heads": 2, "dim_head": 16, "conv_kernel": 3},
    "text": {"bpe_vocab_size": 300, "text_len": 12},
    "train": {"warmup_steps": 0, "checkpoint_every": 3, "eval_every": 3, "eval_batches": 1, "log_every": 1},
    "sampling": {"guidance": 1.5},
}



@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae")
    vae = DiscreteVAE(DVAEConfig(image_size=16, channels=3, vocab_size=32, n_hid=8, n_blk_per_group=1,
                                 group_count=3, n_init=8))  # 16px -> 4x4 ids
    save_toml({"kind": "dvae", "model": to_dict(vae.cfg)}, path / "config.toml")
    save_weights(vae, path / "model.safetensors")
    return path


def test_train_dalle_end_to_end(vae_run, tmp_path, monkeypatch):
    cfg = tmp_path / "dalle.toml"
    save_toml(CONFIG, cfg)
    out = tmp_path / "run"
    assert main(["train", "dalle", "--data", "shapes", "--vae", str(vae_run), "--out", str(out),
                 "--config", str(cfg), "--steps", "3", "--batch-size", "8"]) == 0
    for name in ("config.toml", "model.safetensors", "tokenizer.json", "vae/config.toml", "vae/model.safetensors",
                 "codes_train.safetensors", "codes_test.safetensors", "samples.png"):
        assert (out / name).is_file(), name
    # only what the run draws is encoded: 3 steps x 8 train items of the 48, 1 eval batch of 8 of the 16
    from safetensors.torch import load_file

    train_codes = load_file(out / "codes_train.safetensors")
    assert len(train_codes["codes"]) == 24 and len(set(train_codes["index"].tolist())) == 24
    assert len(load_file(out / "codes_test.safetensors")["codes"]) == 8
    assert Image.open(out / "samples.png").size[0] > 16

    pipe = TextToImage.load(out)
    assert pipe.sampling.guidance == 1.5 and pipe.sampling.top_k == 0
    images = pipe("a red circle", num_images=2, seed=0)
    assert len(images) == 2 and images[0].size == (16, 16)

    # a second setup reads the cached ids instead of encoding again
    def no_encoding(*a, **k):
        raise AssertionError("encoded again")

    monkeypatch.setattr(dalle_task, "encode_dataset", no_encoding)
    setup = get_task("dalle")(TaskArgs(out=out, data="shapes", config=CONFIG, vae=str(vae_run), resume=True,
                                       steps=3, batch_size=8))
    item = setup.train_data[0]
    assert item["codes"].shape == (4, 4) and isinstance(item["caption"], str)
    batch = setup.collate([setup.train_data[i] for i in range(3)])
    assert batch["text"].shape == (3, 12) and batch["codes"].shape == (3, 4, 4)
    loss, metrics = setup.model.loss(batch)
    assert torch.isfinite(loss) and "image_bits_per_token" in metrics


def test_cached_ids_equal_encoding(vae_run, tmp_path):
    vae = load_vae(vae_run)
    from cvformers.data import build_dataset

    data = build_dataset("shapes", "test", 16, size=8)
    codes, index = dalle_task.cached_codes(vae, data, tmp_path / "c.safetensors", key="k1")
    images = torch.stack([data[i]["image"] for i in range(8)])
    assert torch.equal(codes.long(), vae.encode(images)) and torch.equal(index, torch.arange(8))
    again, _ = dalle_task.cached_codes(vae, data, tmp_path / "c.safetensors", key="k1")
    assert torch.equal(again, codes)
    (tmp_path / "c.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{torn")  # a torn cache
    rebuilt, _ = dalle_task.cached_codes(vae, data, tmp_path / "c.safetensors", key="k1")
    assert torch.equal(rebuilt, codes)


def _png_with_bad_pixels(image) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    w, h = image.size
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"not zlib data" * 4) + chunk(b"IEND", b"")


class _RedTokenizer(torch.nn.Module):
    """A stand-in image tokenizer whose id is the red level of a solid image: shows which image a row came from."""

    num_tokens = 256

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def encode(self, images):
        return (images[:, 0, :1, :1] * 255).round().long()


def test_folder_with_undecodable_images_keeps_each_caption_with_its_image(tmp_path):
    """A file that passes the header check but fails to decode is left out of the ids; every
    remaining row's caption is the caption of the file its image came from."""
    import io

    from PIL import Image as PILImage

    from cvformers.data import build_dataset

    folder = tmp_path / "pairs"
    folder.mkdir()
    broken = {2, 3, 6}
    for i in range(9):
        buf = io.BytesIO()
        PILImage.new("RGB", (64, 64), (20 * i, 0, 0)).save(buf, format="PNG")
        data = buf.getvalue()
        if i in broken:  # valid chunks and CRCs (the header check passes), pixel data that does not inflate
            image = PILImage.new("RGB", (64, 64), (20 * i, 0, 0))
            data = _png_with_bad_pixels(image)
        (folder / f"{i}.png").write_bytes(data)
        (folder / f"{i}.txt").write_text(f"item {i}")
    source = build_dataset(f"folder:{folder}", image_size=8)
    assert len(source) == 9  # the broken files only fail while decoding
    codes, index = dalle_task.cached_codes(_RedTokenizer(), source, tmp_path / "codes.safetensors", key="k", desc="")
    assert index.tolist() == [i for i in range(9) if i not in broken]
    pairs = dalle_task.CaptionCodesDataset(source, codes, index)
    for row in range(len(pairs)):
        level = int(pairs[row]["codes"].flatten()[0])
        assert pairs[row]["caption"] == f"item {round(level / 20)}"


def test_needs_a_vae(tmp_path):
    assert main(["train", "dalle", "--data", "shapes", "--out", str(tmp_path / "r")]) == 2


def test_factorised_tokenizer_gives_a_pair_id_dalle(tmp_path):
    from cvformers.models.dalle import PairHead
    from cvformers.vae.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(image_size=16, vocab_size=16, code_dim=8, n_hid=8, group_count=3, n_init=8,
                            colour_vocab_size=4))
    vae.loss({"image": torch.rand(4, 3, 16, 16)})  # initialise the codebooks
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    save_toml({"kind": "vqvae", "model": to_dict(vae.cfg)}, vae_dir / "config.toml")
    save_weights(vae, vae_dir / "model.safetensors")
    cfg = tmp_path / "dalle.toml"
    save_toml(CONFIG, cfg)
    out = tmp_path / "run"
    assert main(["train", "dalle", "--data", "shapes", "--vae", str(vae_dir), "--out", str(out),
                 "--config", str(cfg), "--steps", "2", "--batch-size", "8"]) == 0
    pipe = TextToImage.load(out)
    assert pipe.model.cfg.image_inner_vocab == 4 and isinstance(pipe.model.image_head, PairHead)
    assert len(pipe("a red circle", num_images=2, seed=0)) == 2
    # a pair-id model with a plain tokenizer is refused with the reason
    plain = VQVAE(VQVAEConfig(image_size=16, vocab_size=64, code_dim=8, n_hid=8, group_count=3, n_init=8))
    with pytest.raises(UserError, match="image_inner_vocab"):
        TextToImage(pipe.model, plain, pipe.tokenizer)
