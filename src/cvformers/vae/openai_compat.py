"""Load OpenAI's released dVAE weights (``encoder.pkl``, ``decoder.pkl``) without running pickled code.

The release ships whole pickled modules (``torch.save`` of ``dall_e.encoder.Encoder`` and
``dall_e.decoder.Decoder``); a plain ``torch.load`` would import ``dall_e`` and execute whatever
the pickle names. Here the unpickler resolves every class of ``dall_e`` and ``torch.nn`` to an
inert placeholder that only stores its attributes, allows the few functions that rebuild
tensors, and refuses everything else. The placeholders are then read like a module tree:
parameters become a state dict in this package's layout, and the constructor arguments
(``n_hid``, ``n_blk_per_group``, ``vocab_size`` …) come from their attributes.

Usage::

    vae = load_openai_dvae("encoder.pkl", "decoder.pkl")   # a cvformers DiscreteVAE, 256 px -> 32×32
    ids = vae.encode(images)                                 # images in [0,1]
"""

from __future__ import annotations

import _compat_pickle
import collections
import pickle
import re
import types
import warnings
from pathlib import Path
from typing import Any

import torch

from cvformers.errors import UserError
from cvformers.vae.dvae import DiscreteVAE, DVAEConfig


class PickledObject:
    """Inert stand-in for a class named in the pickle: it keeps the attributes, runs nothing."""

    pickled_class = "?"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state for {self.pickled_class}: {type(state).__name__}")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_class}>"


# Prefixes of modules whose classes become placeholders (never imported).
_PLACEHOLDER_MODULES = ("dall_e.", "torch.nn.modules.")

# The only callables the pickle may reach: tensor and parameter rebuilding, and plain containers.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("torch", "device"): torch.device,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
}


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._placeholders: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles name Python 2 modules (__builtin__.set); no Python 3 module has those names
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module.startswith(_PLACEHOLDER_MODULES):
            path = f"{module}.{name}"
            if path not in self._placeholders:
                self._placeholders[path] = type(name, (PickledObject,), {"pickled_class": path})
            return self._placeholders[path]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a dVAE module or tensor")


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load's ``pickle_module``: it uses ``Unpickler`` (and ``load`` for the legacy format).
restricted_pickle = types.ModuleType("cvformers_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load


def read_pickled_module(path: str | Path) -> tuple[PickledObject, dict[str, torch.Tensor]]:
    """A ``torch.save``-d module -> (its placeholder tree, its parameters by dotted name)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        with warnings.catch_warnings():
            # the legacy format compares each module's saved source with the live class; ours are stand-ins
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            root = torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: {e}") from e
    if not isinstance(root, PickledObject):
        raise UserError(f"{path}: expected a pickled dall_e module, found {type(root).__name__}")
    params: dict[str, torch.Tensor] = {}

    def walk(obj: PickledObject, prefix: str) -> None:
        for name, p in obj.__dict__.get("_parameters", {}).items():
            if p is not None:
                params[prefix + name] = p.detach()
        for name, child in obj.__dict__.get("_modules", {}).items():
            if isinstance(child, PickledObject):
                walk(child, f"{prefix}{name}.")

    walk(root, "")
    return root, params


def _group_count(root: PickledObject) -> int:
    blocks = root.__dict__.get("_modules", {}).get("blocks")
    names = blocks.__dict__.get("_modules", {}) if isinstance(blocks, PickledObject) else {}
    return sum(1 for n in names if n.startswith("group_"))


# release names -> this package's names (dvae.py): blocks.input -> stem, blocks.output.conv -> head,
# blocks.group_i.block_j.{id_path, res_path.conv_k} -> groups.(i-1).blocks.(j-1).{skip, convk}
_RENAMES = [
    (re.compile(r"^blocks\.input\.([wb])$"), r"stem.\1"),
    (re.compile(r"^blocks\.output\.conv\.([wb])$"), r"head.\1"),
    (re.compile(r"^blocks\.group_(\d+)\.block_(\d+)\.id_path\.([wb])$"), r"groups.{g}.blocks.{b}.skip.\3"),
    (re.compile(r"^blocks\.group_(\d+)\.block_(\d+)\.res_path\.conv_(\d)\.([wb])$"), r"groups.{g}.blocks.{b}.conv\3.\4"),
]


def openai_key_to_cvformers(key: str) -> str:
    for pattern, repl in _RENAMES:
        m = pattern.match(key)
        if m:
            if "{g}" in repl:
                repl = repl.format(g=int(m.group(1)) - 1, b=int(m.group(2)) - 1)
            new = pattern.sub(repl, key)
            return new[: -len(".w")] + ".weight" if new.endswith(".w") else new[: -len(".b")] + ".bias"
    raise UserError(f"unexpected parameter {key!r} in the released dVAE")


def load_openai_dvae(encoder_pkl: str | Path, decoder_pkl: str | Path, image_size: int = 256) -> DiscreteVAE:
    """OpenAI's ``encoder.pkl`` + ``decoder.pkl`` -> a cvformers ``DiscreteVAE`` with the same weights.

    ``image_size`` only sets the tokenizer's declared size (the network is convolutional; the
    release was trained at 256 px, giving a 32×32 grid).
    """
    enc, enc_params = read_pickled_module(encoder_pkl)
    dec, dec_params = read_pickled_module(decoder_pkl)
    e, d = enc.__dict__, dec.__dict__
    try:
        hp = dict(
            vocab_size=(e["vocab_size"], d["vocab_size"]),
            n_hid=(e["n_hid"], d["n_hid"]),
            n_blk_per_group=(e["n_blk_per_group"], d["n_blk_per_group"]),
            channels=(e["input_channels"], d["output_channels"]),
            group_count=(_group_count(enc), _group_count(dec)),
        )
        n_init = int(d["n_init"])
    except KeyError as err:
        raise UserError(f"{encoder_pkl} / {decoder_pkl}: not a dall_e Encoder/Decoder pair (no {err})") from None
    for name, (a, b) in hp.items():
        if a != b:
            raise UserError(f"encoder and decoder disagree on {name}: {a} vs {b}")
    cfg = DVAEConfig(image_size=image_size, n_init=n_init, **{k: int(v[0]) for k, v in hp.items()})
    state = {f"encoder.{openai_key_to_cvformers(k)}": v for k, v in enc_params.items()}
    state |= {f"decoder.{openai_key_to_cvformers(k)}": v for k, v in dec_params.items()}
    model = DiscreteVAE(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()
