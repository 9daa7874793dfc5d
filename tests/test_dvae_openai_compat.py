"""cvformers' dVAE against OpenAI's released code (PyPI ``dall-e``), and the safe .pkl loader.

Needs ``pip install --no-deps dall-e attrs requests urllib3 idna charset-normalizer certifi``
(``import dall_e`` imports ``requests``); skipped when ``dall_e`` is not importable.
"""

import pickle

import pytest
import torch
import torch.nn.functional as F

from cvformers.errors import UserError
from cvformers.vae.openai_compat import load_openai_dvae, read_pickled_module

try:
    import dall_e
    from dall_e import Decoder as OpenAIDecoder
    from dall_e import Encoder as OpenAIEncoder
except ImportError as e:  # pragma: no cover - depends on the environment
    dall_e = None
    reason = f"dall_e not importable ({e}); pip install --no-deps dall-e attrs requests urllib3 idna charset-normalizer certifi"

needs_dall_e = pytest.mark.skipif(dall_e is None, reason=reason if dall_e is None else "")
pytestmark = pytest.mark.compat

SMALL = dict(n_hid=64, n_blk_per_group=1, vocab_size=512)  # the release's validators: n_hid >= 64, vocab >= 512


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    torch.manual_seed(0)
    enc = OpenAIEncoder(**SMALL, requires_grad=False)
    dec = OpenAIDecoder(**SMALL, n_init=32, requires_grad=False)
    # the release initialises biases to zero; randomise them so the test sees every parameter
    with torch.no_grad():
        for p in [*enc.parameters(), *dec.parameters()]:
            if p.dim() == 1:
                p.normal_(std=0.1)
    folder = tmp_path_factory.mktemp("openai")
    torch.save(enc, folder / "encoder.pkl")
    torch.save(dec, folder / "decoder.pkl")
    return enc.eval(), dec.eval(), folder


def official_reconstruct(enc, dec, images):
    """The release's usage: argmax codes, one-hot, decode, sigmoid of μ, unmap."""
    logits = enc(dall_e.map_pixels(images))
    z = F.one_hot(logits.argmax(1), enc.vocab_size).permute(0, 3, 1, 2).float()
    return logits, dall_e.unmap_pixels(torch.sigmoid(dec(z)[:, :3]))


@needs_dall_e
def test_released_modules_load_and_match(official):
    enc, dec, folder = official
    vae = load_openai_dvae(folder / "encoder.pkl", folder / "decoder.pkl", image_size=32)
    assert (vae.cfg.n_hid, vae.cfg.n_blk_per_group, vae.cfg.vocab_size) == (64, 1, 512)
    assert (vae.cfg.group_count, vae.cfg.n_init, vae.cfg.channels) == (4, 32, 3)
    assert vae.grid_size == 4
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want_logits, want_images = official_reconstruct(enc, dec, images)
        got_logits = vae.logits(images)
    assert (got_logits - want_logits).abs().max() <= 1e-5
    ids = vae.encode(images)
    assert torch.equal(ids, want_logits.argmax(1))
    assert (vae.decode(ids) - want_images).abs().max() <= 1e-5


@needs_dall_e
def test_legacy_serialization_format_loads(official, tmp_path):
    enc, dec, _ = official
    torch.save(enc, tmp_path / "encoder.pkl", _use_new_zipfile_serialization=False)
    torch.save(dec, tmp_path / "decoder.pkl", _use_new_zipfile_serialization=False)
    vae = load_openai_dvae(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl", image_size=32)
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert (vae.logits(images) - enc(dall_e.map_pixels(images))).abs().max() <= 1e-5


class Payload:
    """Pickles as a call to os.system: what a hostile .pkl would contain."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_loader_refuses_code_in_the_pickle(tmp_path):
    torch.save({"x": Payload()}, tmp_path / "evil.pkl")
    with pytest.raises(UserError, match="refusing to load (posix|os)"):
        read_pickled_module(tmp_path / "evil.pkl")


def test_loader_refuses_non_module(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "state.pkl")
    with pytest.raises(UserError, match="expected a pickled dall_e module"):
        read_pickled_module(tmp_path / "state.pkl")
    with pytest.raises(UserError, match="not found"):
        read_pickled_module(tmp_path / "missing.pkl")
