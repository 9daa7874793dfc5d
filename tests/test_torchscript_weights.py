"""TorchScript archives (OpenAI's CLIP .pt files) are read for their tensors; their code never runs."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch
from torch import nn

from cvformers.errors import UserError
from cvformers.loading import read_state_dict
from cvformers.torchscript_weights import read_torchscript_weights


class Scripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)
        self.register_buffer("scale", torch.full((2,), 0.5))
        self.mask = torch.zeros(2, 2)  # a plain tensor attribute: not part of the state dict
        self.seq = nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.LayerNorm(2))

    def forward(self, x):
        return self.seq(self.proj(x)) * self.scale + self.mask.sum()


def test_same_state_dict_as_torch_jit_load(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.jit.script(Scripted()).save(str(path))
    reference = torch.jit.load(str(path)).state_dict()  # our own, trusted archive
    got = read_state_dict(path)
    assert sorted(got) == sorted(reference)
    for k, v in reference.items():
        assert torch.equal(got[k], v) and got[k].dtype == v.dtype, k


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_an_archive_whose_pickle_runs_code_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.jit.script(Scripted()).save(str(path))
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps(_Payload(marker), protocol=2)
            dst.writestr(item, data)
    with pytest.raises(UserError, match="not allowed"):
        read_state_dict(evil)
    assert not marker.exists()
    with pytest.raises(UserError):
        read_torchscript_weights(tmp_path / "model.pt.missing")
