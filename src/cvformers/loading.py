"""Reading finished runs and bundles back, and the weight files they hold.

Below the trainer, the tasks and the pipelines: anything that needs a trained model loads it
here, never through a training file. Nothing is unpickled: weights are safetensors, configs
TOML, and a model is rebuilt from ``kind`` + ``[model]`` by ``cvformers.registry``.

    load_run(path)   -> (module in eval mode, run config)  any run folder or bundle part
    load_vae(path)   -> frozen image tokenizer (dvae, vqvae)
    load_clip(path)  -> (CLIP, caption tokenizer) from a run folder or a released weight file
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from cvformers.config import load_toml
from cvformers.errors import UserError
from cvformers.utils import atomic_save

CONFIG = "config.toml"
WEIGHTS = "model.safetensors"
TEACHER_WEIGHTS = "teacher.safetensors"  # a dino run's teacher (the EMA of the student), what evaluation uses
TOKENIZER_FILE = "tokenizer.json"  # a run's caption BPE (cvformers.text)
DEFAULT_NAME = "default"  # the shipped DALL-E bundle; "default/vae" and "default/clip" name its parts
UNCLIP_NAME = "unclip"  # the shipped DALL-E 2 (unCLIP) bundle; "unclip/prior", "unclip/decoder", …
SHIPPED = (DEFAULT_NAME, UNCLIP_NAME)


def default_bundle(name: str = DEFAULT_NAME) -> Path:
    """Where a shipped bundle lies inside the installed package (editable or not)."""
    from importlib.resources import files

    return Path(str(files("cvformers") / "assets" / name))


def resolve_run(path_or_name: str | Path) -> Path:
    """A run folder from a path, or from a name of a shipped bundle: ``default``, ``default/vae``,
    ``default/clip``, ``unclip``, ``unclip/decoder`` … (the name wins over a folder of that name in
    the cwd)."""
    text = str(path_or_name)
    for name in SHIPPED:
        if text == name or text.startswith(name + "/"):
            part = text[len(name):].strip("/")
            root = default_bundle(name)
            path = root / part if part else root
            if not (path / CONFIG).is_file():
                known = ", ".join([name] + [f"{name}/{p.name}" for p in sorted(root.glob("*"))
                                            if (p / CONFIG).is_file()])
                raise UserError(f"{text!r} is not part of the shipped models (installed in {root}); known: {known}")
            return path
    path = Path(path_or_name)
    if not path.exists():
        raise UserError(f"unknown model {text!r}: not one of {', '.join(SHIPPED)} and no such folder")
    return path
_ALIASES = "cvformers.aliases"  # safetensors metadata key: {dropped name: stored name}


# --- weights ------------------------------------------------------------------------------

def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def save_weights(
    model: nn.Module | dict[str, torch.Tensor],
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a state dict as safetensors, atomically.

    Tied weights (two names, one tensor — e.g. an embedding shared with the output layer)
    are stored once and the other name is recorded in the metadata, so ``load_weights``
    restores both. ``dtype`` (e.g. ``torch.float16`` for a shipped bundle) casts the
    floating-point tensors; integer buffers keep their type.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    stored: dict[str, torch.Tensor] = {}
    first_name: dict[Any, str] = {}
    aliases: dict[str, str] = {}
    seen_storage: set[int] = set()
    for name, t in state.items():
        t = t.detach()
        if t.numel() > 0:
            key = _storage_key(t)
            if key in first_name:
                aliases[name] = first_name[key]
                continue
            first_name[key] = name
        shares = t.numel() > 0 and t.untyped_storage().data_ptr() in seen_storage
        if t.numel() > 0:
            seen_storage.add(t.untyped_storage().data_ptr())
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        if shares:  # a view into a tensor already stored: safetensors wants its own memory
            t = t.clone()
        stored[name] = t
    meta = {"format": "pt", **(metadata or {})}
    if aliases:
        meta[_ALIASES] = json.dumps(aliases, sort_keys=True)
    path = Path(path)
    atomic_save(path, lambda tmp: save_file(stored, tmp, metadata=meta))
    return path


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with tied names restored, metadata) from a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                state[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e
    for alias, name in json.loads(meta.get(_ALIASES, "{}")).items():
        state[alias] = state[name]
    return state, meta


def upgrade_keys(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the keys of an earlier layout renamed by the modules of ``model`` that changed
    theirs: each module with an ``upgrade_state_dict(state, prefix)`` (Swin, moved to timm's layout).
    Values pass untouched, so this works on tensors and on header shapes alike."""
    for name, module in model.named_modules():
        upgrade = getattr(module, "upgrade_state_dict", None)
        if callable(upgrade):
            state = upgrade(state, f"{name}." if name else "")
    return state


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> dict[str, str]:
    """Load ``path`` into ``model`` (cast to each parameter's own dtype); return the metadata.

    ``strict``: every key of the model must be in the file and nothing else; a mismatch is a
    ``UserError`` naming the file and the first keys that differ.
    """
    state, meta = read_weights(path)
    state = upgrade_keys(model, state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if strict and (missing or unexpected):
        raise UserError(
            f"{path}: weights do not match the model "
            f"(missing: {missing[:5]}{' …' if len(missing) > 5 else ''}; "
            f"unexpected: {unexpected[:5]}{' …' if len(unexpected) > 5 else ''})"
        )
    params = {name for name, _ in model.named_parameters()}
    for k, t in state.items():
        if k in expected and tuple(t.shape) != tuple(expected[k].shape):
            raise UserError(f"{path}: {k} has shape {tuple(t.shape)}, the model wants {tuple(expected[k].shape)}")
        if k in params and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{path}: {k} holds NaN or infinite values; the weights are damaged "
                            "(a diverged run, or a broken file): use an earlier checkpoint")
    cast = {k: t.to(expected[k].dtype) if t.is_floating_point() else t for k, t in state.items() if k in expected}
    model.load_state_dict(cast, strict=strict)
    return meta


# --- runs -----------------------------------------------------------------

def load_run(path: str | Path, device: str | torch.device = "cpu", weights: str | None = None
             ) -> tuple[nn.Module, dict[str, Any]]:
    """A trained model from its run folder, in eval mode, and the run's config as a dict.

    Reads ``config.toml`` (``kind`` + ``[model]``), rebuilds the module with
    ``cvformers.registry.build_model`` and loads ``model.safetensors`` (or the run's other weight
    file ``weights`` with the same keys, e.g. a dino run's ``teacher.safetensors``) strictly.
    Nothing is unpickled.
    """
    weights = weights or WEIGHTS
    from cvformers.registry import build_model

    run_dir = resolve_run(path)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    for name in (CONFIG, weights):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir} is not a finished run: {name} is missing")
    cfg = load_toml(run_dir / CONFIG)
    if "kind" not in cfg:
        raise UserError(f"{run_dir / CONFIG} has no 'kind' (which model to build)")
    # Shapes first, on the meta device (no memory): a config that disagrees with the weights, or
    # that would allocate far more than the file holds, is refused before anything is allocated.
    with torch.device("meta"):
        skeleton = build_model(cfg["kind"], cfg.get("model", {}))
    check_shapes(skeleton, run_dir / weights)
    model = build_model(cfg["kind"], cfg.get("model", {}))
    load_weights(model, run_dir / weights)
    return model.to(device).eval(), cfg


def check_shapes(model: nn.Module, path: str | Path) -> None:
    """Compare the model's tensor shapes with the safetensors header of ``path`` (no data read)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e
    for alias, name in json.loads(meta.get(_ALIASES, "{}")).items():
        if name in shapes:
            shapes[alias] = shapes[name]
    shapes = upgrade_keys(model, shapes)
    for k, t in model.state_dict().items():
        if k not in shapes:
            raise UserError(f"{path}: weights do not match the run's config ({k} is missing from the file)")
        if shapes[k] != tuple(t.shape):
            raise UserError(f"{path}: {k} has shape {shapes[k]} but the run's config builds {tuple(t.shape)}; "
                            "config.toml and the weights do not belong together")


def load_vae(path: str | Path, device: str | torch.device = "cpu"):
    """A trained image tokenizer (dvae, vqvae) from its run folder: frozen, in eval mode."""
    vae, cfg = load_run(path, device)
    for attr in ("encode", "decode", "num_tokens", "grid_size"):
        if not hasattr(vae, attr):
            raise UserError(f"{path} holds a {cfg.get('kind')!r} model, not an image tokenizer (no {attr})")
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae.eval()


# --- CLIP ------------------------------------------------------------------


def load_text_tokenizer(cfg, run_dir: str | Path | None = None,
                        vocab: str | Path | None = None):
    """The tokenizer the model config names: ``texts -> LongTensor[B, context_length]``."""
    if cfg.tokenizer == "clip":
        from cvformers.clip_tokenizer import ClipTokenizer

        return ClipTokenizer.load(vocab, context_length=cfg.context_length)
    from cvformers.text import BPETokenizer

    path = Path(vocab) if vocab is not None else Path(run_dir or ".") / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"text tokenizer not found: {path}")
    return BPETokenizer.load(path)


def load_clip(source: str | Path, vocab: str | Path | None = None, quick_gelu: bool = True,
              device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer) from a run folder or an OpenAI / open_clip weight file.

    For a weight file, ``quick_gelu`` says whether it was trained with QuickGELU (OpenAI's: yes;
    open_clip's LAION ViT-B-32: no) and ``vocab`` where CLIP's BPE merges are (default: the
    installed open_clip's).
    """
    source = resolve_run(source) if str(source).split("/")[0] in SHIPPED else Path(source)
    if source.is_dir():
        model, run_cfg = load_run(source, device=device)
        if run_cfg.get("kind") != "clip":
            raise UserError(f"{source} holds a {run_cfg.get('kind')!r} model, not a CLIP")
        return model, load_text_tokenizer(model.cfg, source, vocab)
    if not source.is_file():
        raise UserError(f"CLIP run folder or checkpoint not found: {source}")
    from cvformers.models.clip import load_openai_state_dict

    model = load_openai_state_dict(read_state_dict(source), quick_gelu=quick_gelu).to(device)
    return model, load_text_tokenizer(model.cfg, None, vocab)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict from safetensors, a torch.save'd dict, or OpenAI's TorchScript archive."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        if _is_torchscript(path):  # OpenAI's released .pt files: read the tensors, never run the code
            from cvformers.torchscript_weights import read_torchscript_weights

            sd = read_torchscript_weights(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"cannot read CLIP weights from {path}: {type(e).__name__}: {first}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]  # open_clip training checkpoints
    if not isinstance(sd, dict):
        raise UserError(f"{path} does not hold a state dict")
    return sd


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.split("/")[1:2] == ["code"] for name in z.namelist())


# --- vision backbones: timm's create_model(checkpoint_path=…) and init_from -------------------

# backbone settings that change no shape: a checkpoint may differ in them
FREE_SETTINGS = {"num_classes", "dropout", "attn_dropout", "drop_path"}
BACKBONE_KINDS = ("classifier", "dino")  # run kinds that hold a vision backbone (under "backbone.")


def source_backbone(run: str | Path, label: str | None = None
                    ) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(family, backbone config table, backbone state dict) of a classifier or dino run (its teacher,
    the network DINO evaluates). ``label`` names the source in errors."""
    label = label or f"init_from = {str(run)!r}"
    run = Path(run)
    if not (run / CONFIG).is_file():
        raise UserError(f"{label}: not a run folder (no config.toml)")
    cfg = load_toml(run / CONFIG)
    kind, model = cfg.get("kind"), cfg.get("model", {})
    if kind not in BACKBONE_KINDS:
        raise UserError(f"{label}: a {kind!r} run has no vision backbone (give a dino or classifier run)")
    weights = run / (TEACHER_WEIGHTS if kind == "dino" and (run / TEACHER_WEIGHTS).is_file() else WEIGHTS)
    state, _ = read_weights(weights)
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return model.get("family", "vit"), dict(model.get("backbone", {})), backbone


def check_backbone_config(backbone: nn.Module, family: str, src_family: str, src_cfg: dict[str, Any],
                          label: str) -> None:
    """Refuse, with the settings that differ, a source backbone of another architecture."""
    from cvformers.config import to_dict

    if src_family != family:
        raise UserError(f"{label}: its backbone is a {src_family}, this model's a {family}")
    mine = to_dict(backbone.cfg)
    differ = [f"{k} {src_cfg.get(k)!r} there, {mine.get(k)!r} here" for k in sorted(set(mine) | set(src_cfg))
              if k not in FREE_SETTINGS and src_cfg.get(k) != mine.get(k)]
    if differ:
        raise UserError(f"{label}: its {family} backbone does not match this model's (" + "; ".join(differ) + ")")


def load_backbone_state(backbone: nn.Module, state: dict[str, torch.Tensor], label: str,
                        keep_head: bool = True) -> None:
    """Load a backbone's state dict (timm's keys; earlier layouts renamed by ``upgrade_keys``),
    refusing missing, unexpected or misshapen tensors with their names. ``keep_head`` False
    leaves the model's own (new) head."""
    head = getattr(backbone, "classifier_name", "head") + "."
    state = upgrade_keys(backbone, dict(state))
    if not keep_head:
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state and (keep_head or not k.startswith(head))]
    unexpected = [k for k in state if k not in expected]
    # a ViT resizes its position embeddings to its own grid (ViT §3.2), so their shape may differ
    misshapen = [f"{k} {tuple(state[k].shape)} there, {tuple(expected[k].shape)} here" for k in state
                 if k in expected and k != "pos_embed" and state[k].shape != expected[k].shape]
    if missing or unexpected or misshapen:
        hint = "; pass num_classes=N for a new head" if any(m.startswith(head) for m in misshapen) else ""
        raise UserError(f"{label}: the weights do not fit this architecture (missing {missing[:4]}, unexpected "
                        f"{unexpected[:4]}, shapes: {'; '.join(misshapen[:4]) or 'same'}){hint}")
    try:
        backbone.load_state_dict(state, strict=keep_head)
    except (RuntimeError, ValueError) as e:  # e.g. position embeddings of a grid that is not square
        raise UserError(f"{label}: {str(e).splitlines()[0]}") from e


def init_backbone_from(backbone: nn.Module, family: str, run: str | Path, label: str | None = None) -> None:
    """Load the backbone of a classifier or dino ``run`` into ``backbone`` (a registry model of
    ``family``) with a new head, refusing one whose architecture does not match, with the reason."""
    label = label or f"init_from = {str(run)!r}"
    src_family, src_cfg, state = source_backbone(run, label)
    check_backbone_config(backbone, family, src_family, src_cfg, label)
    load_backbone_state(backbone, state, label, keep_head=False)


def create_model(name: str, pretrained: bool = False, checkpoint_path: str | Path | None = None,
                 num_classes: int | None = None, **overrides: Any) -> nn.Module:
    """timm's ``create_model``: the backbone of preset ``name`` (``cvformers.list_models()``), with
    the weights of ``checkpoint_path`` when given — a safetensors file of the backbone's keys
    (timm's; a classifier or dino run's ``backbone.`` prefix is taken off) or a classifier / dino
    run folder. ``num_classes`` sets the head (default: the preset's, or the run's); a head whose
    size differs from the checkpoint's starts new. An architecture that does not match the
    checkpoint is refused with the reason.
    """
    from cvformers.models.vision import create_model as build, preset_config

    if checkpoint_path is None:
        return build(name, pretrained=pretrained, num_classes=num_classes, **overrides)
    family, _ = preset_config(name)  # an unknown name is refused before the checkpoint is read
    path = Path(checkpoint_path)
    label = f"checkpoint {str(checkpoint_path)!r}"
    if path.is_dir():
        src_family, src_cfg, state = source_backbone(path, label)
        classes = src_cfg.get("num_classes") if num_classes is None else num_classes
        model = build(name, num_classes=classes, **overrides)
        check_backbone_config(model, family, src_family, src_cfg, label)
        load_backbone_state(model, state, label, keep_head=classes == src_cfg.get("num_classes"))
        return model
    state, _ = read_weights(path)
    if any(k.startswith("backbone.") for k in state):  # a classifier or dino run's weight file
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    model = build(name, num_classes=num_classes, **overrides)
    head_key = f"{model.classifier_name}.weight"
    stored_head = upgrade_keys(model, dict(state)).get(head_key)
    new_head = num_classes is not None and (stored_head is None or stored_head.shape[0] != num_classes)
    load_backbone_state(model, state, label, keep_head=not new_head)
    return model
