"""The weights of a TorchScript archive (OpenAI's released CLIP ``.pt`` files), read without
running any of its code.

``torch.jit.load`` compiles and runs the archive's ``code/`` (a crafted file can do anything).
Here the archive is opened as the zip it is: ``data.pkl`` is unpickled by an unpickler that
knows exactly two callables — the tensor rebuilder and ``OrderedDict`` — and stands a plain
record in for every scripted class; the tensors' bytes come from ``data/<key>``. Which
attributes of a module are parameters or buffers (and so belong in the state dict) is read,
as text, from the ``__parameters__`` / ``__buffers__`` lines of its class in ``code/``.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from cvformers.errors import UserError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stands in for an instance of a scripted class: keeps its attributes, runs nothing."""

    qualname = ""

    def __setstate__(self, state):
        self.attrs = state if isinstance(state, dict) else {}


class _Storage:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    data, dtype = storage
    flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
    return torch.as_strided(flat, tuple(size), tuple(stride), offset).clone()


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.root = archive, root
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(_STORAGE_DTYPES[name])
        if module == "__torch__" or module.startswith("__torch__."):
            key = f"{module}.{name}"
            if key not in self.classes:  # one stand-in class per scripted class, named for it
                self.classes[key] = type(name, (_ScriptObject,), {"qualname": key})
            return self.classes[key]
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights archive")

    def persistent_load(self, pid):
        kind, storage, key, _location, _numel = pid
        if kind != "storage" or not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self.archive.read(f"{self.root}/data/{key}"), storage.dtype


def _declared(archive: zipfile.ZipFile, root: str, qualname: str) -> tuple[list[str], list[str]]:
    """(parameter names, buffer names) of a scripted class, read from its source as text."""
    module, _, name = qualname.rpartition(".")
    path = f"{root}/code/{module.replace('.', '/')}.py"
    try:
        source = archive.read(path).decode("utf-8")
    except KeyError:
        return [], []
    block = re.search(rf"^class {re.escape(name)}\(.*?\):\n(.*?)(?=^class |\Z)", source, re.S | re.M)
    body = block.group(1) if block else ""

    def names(field: str) -> list[str]:
        m = re.search(rf"^\s+{field} = \[(.*?)\]", body, re.M)
        return re.findall(r'"([^"]+)"', m.group(1)) if m else []

    return names("__parameters__"), names("__buffers__")


def read_torchscript_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict (parameters and buffers, dotted names) of a TorchScript archive."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"cannot read {path} as a TorchScript archive ({e})") from e
    with archive:
        pkls = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise UserError(f"{path}: expected one <name>/data.pkl in the archive, found {len(pkls)}")
        root = pkls[0].split("/")[0]
        try:
            top = _ArchiveUnpickler(archive.read(pkls[0]), archive, root).load()
        except (pickle.UnpicklingError, ValueError, KeyError, TypeError, RuntimeError, EOFError) as e:
            raise UserError(f"{path}: refused or unreadable weights archive ({e})") from e
        state: dict[str, torch.Tensor] = {}

        def walk(obj: _ScriptObject, prefix: str) -> None:
            params, buffers = _declared(archive, root, obj.qualname)
            for key, value in getattr(obj, "attrs", {}).items():
                if isinstance(value, _ScriptObject):
                    walk(value, f"{prefix}{key}.")
                elif isinstance(value, torch.Tensor) and key in params + buffers:
                    state[prefix + key] = value

        if not isinstance(top, _ScriptObject):
            raise UserError(f"{path}: the archive does not hold a scripted module")
        walk(top, "")
    return state
