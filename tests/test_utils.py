import os

import pytest
import torch

from cvformers.images import image_grid
from cvformers.utils import atomic_save, atomic_write_bytes


def test_atomic_write_gives_normal_permissions(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_bytes(p, b"hello")
    assert p.read_bytes() == b"hello"
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(p).st_mode & 0o777 == 0o666 & ~mask
    atomic_save(tmp_path / "b.pt", lambda f: torch.save({"x": 1}, f))
    assert os.stat(tmp_path / "b.pt").st_mode & 0o777 == 0o666 & ~mask
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_image_grid_places_images():
    imgs = torch.rand(3, 3, 4, 5)
    g = image_grid(imgs, nrow=2, pad=1)
    assert g.shape == (3, 1 + 2 * 5, 1 + 2 * 6)
    assert torch.equal(g[:, 1:5, 1:6], imgs[0])
    assert torch.equal(g[:, 6:10, 1:6], imgs[2])


def test_atomic_write_goes_through_symlinks_and_refuses_special_files(tmp_path):
    import os

    from cvformers.errors import UserError
    from cvformers.utils import atomic_write_bytes

    target = tmp_path / "real.png"
    target.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        atomic_write_bytes(fifo, b"x")
    assert fifo.is_fifo()
    with pytest.raises(UserError, match="directory"):
        atomic_write_bytes(tmp_path, b"x")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UserError, match="cannot write"):
        atomic_write_bytes(tmp_path / "file" / "under.png", b"x")
    assert not list(tmp_path.glob(".*.tmp"))
