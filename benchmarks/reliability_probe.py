"""Bad input, crafted files and misuse, run through the CLI: what comes back, what is lost.

Every case runs ``cvformers.cli.main`` in this process inside a fresh sandbox folder and is
scored on four counts: a clean one-line error (exit status 2, or 0 where the input is valid),
a Python traceback, a file written or deleted outside what the command may touch, and code
run by loading a file (a crafted pickle or TorchScript archive that would create a marker).
Kills during training are not here: ``tests/test_checkpoint.py`` kills training with SIGKILL
before every file operation of a checkpoint and at 20 random times, and resumes each bit-exactly.

    python benchmarks/reliability_probe.py            # prints the table and each case's outcome
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import sys
import tempfile
import traceback
import zipfile
from pathlib import Path

import torch

from cvformers import cli
from cvformers.config import load_toml, save_toml
from cvformers.pipelines.text_to_image import default_bundle

PROMPT = "a red circle"


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bundle(work: Path, **changes) -> Path:
    """A copy of the shipped model with its config.toml changed (``model`` / ``sampling`` tables, ``kind``)."""
    dst = work / "bundle"
    shutil.copytree(default_bundle(), dst)
    cfg = load_toml(dst / "config.toml")
    for key, value in changes.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    save_toml(cfg, dst / "config.toml")
    return dst


def _evil_pickle(work: Path) -> Path:
    path = work / "evil.pt"
    torch.save({"state_dict": {}}, path)
    with open(path, "wb") as f:
        pickle.dump(_Payload(work / "MARKER"), f, protocol=2)
    return path


def _evil_torchscript(work: Path) -> Path:
    src = work / "ok.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(src))
    dst = work / "evil.pt"
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for item in a.infolist():
            data = pickle.dumps(_Payload(work / "MARKER"), protocol=2) if item.filename.endswith("/data.pkl") \
                else a.read(item)
            b.writestr(item, data)
    src.unlink()
    return dst


def _toml(work: Path, text: str | bytes) -> Path:
    path = work / "exp.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _png(work: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(work / "red.png")
    return work / "red.png"


def _run_with_image(work: Path, data: bytes) -> Path:
    path = work / "img.png"
    path.write_bytes(data)
    return path


# (name, expected exit status, build argv from the sandbox folder)
CASES = [
    ("generate: valid", 0, lambda w: ["generate", PROMPT, "--num", "1", "--out", w / "out/g.png"]),
    *[(f"generate {flag} {value}", 2, (lambda flag, value: lambda w: ["generate", PROMPT, flag, value, "--out",
                                                                      w / "out/g.png"])(flag, value))
      for flag, value in [("--temperature", "nan"), ("--temperature", "-1"), ("--guidance", "inf"),
                          ("--guidance", "nan"), ("--top-p", "0"), ("--top-p", "1.5"), ("--top-k", "-1"),
                          ("--seed", str(2**64)), ("--seed", "-1"), ("--num", "0"), ("--num", "-4"),
                          ("--candidates", "-1"), ("--candidates", "100000"), ("--num", "abc"),
                          ("--device", "banana"), ("--prompt-rows", "3"), ("--model", "/nonexistent")]],
    ("generate: empty prompt", 2, lambda w: ["generate", "  ", "--out", w / "out/g.png"]),
    ("generate: undecodable prompt", 2, lambda w: ["generate", "a \udcff", "--out", w / "out/g.png"]),
    ("generate: --out is a folder", 2, lambda w: ["generate", PROMPT, "--out", w]),
    ("generate: --out under a file", 2, lambda w: ["generate", PROMPT, "--out", _toml(w, "") / "g.png"]),
    ("generate: --out a pipe", 2, lambda w: (os.mkfifo(w / "pipe"), ["generate", PROMPT, "--out", w / "pipe"])[1]),
    ("generate: image prompt not an image", 2,
     lambda w: ["generate", PROMPT, "--image-prompt", _run_with_image(w, b"not a png"), "--out", w / "out/g.png"]),
    ("generate: NaN-free config, unknown [sampling] key", 2,
     lambda w: ["generate", PROMPT, "--model", _bundle(w, sampling={"temprature": 0.5}), "--out", w / "out/g.png"]),
    ("generate: config 10^4 x the weights", 2,
     lambda w: ["generate", PROMPT, "--model", _bundle(w, model={"dim": 65536, "depth": 64}), "--out", w / "out/g.png"]),
    ("generate: negative width", 2,
     lambda w: ["generate", PROMPT, "--model", _bundle(w, model={"dim": -192}), "--out", w / "out/g.png"]),
    ("generate: kind = 5", 2, lambda w: ["generate", PROMPT, "--model", _bundle(w, kind=5), "--out", w / "out/g.png"]),
    ("generate: pickle as --clip", 2,
     lambda w: ["generate", PROMPT, "--clip", _evil_pickle(w), "--out", w / "out/g.png"]),
    ("generate: TorchScript as --clip", 2,
     lambda w: ["generate", PROMPT, "--clip", _evil_torchscript(w), "--out", w / "out/g.png"]),
    ("zero-shot: TorchScript as --clip", 2,
     lambda w: ["zero-shot", _png(w), "--clip", _evil_torchscript(w), "--labels", "a,b"]),
    ("eval retrieval: pickle as --clip", 2, lambda w: ["eval", "retrieval", "--clip", _evil_pickle(w)]),
    *[(f"train: {name}", 2, (lambda text: lambda w: ["train", "dvae", "--out", w / "out/run", "--config",
                                                     _toml(w, text), "--steps", "1"])(text))
      for name, text in [("[trian] table", "[trian]\nsteps = 3\n"), ("scalar [model]", "model = 5\n"),
                         ("lr nan", "[train]\nlr = nan\n"), ("lr -1", "[train]\nlr = -1.0\n"),
                         ("betas > 1", "[train]\nbetas = [0.9, 1.5]\n"), ("eps 0", "[train]\neps = 0.0\n"),
                         ("weight decay < 0", "[train]\nweight_decay = -0.1\n"),
                         ("misspelt key", "[train]\nstesp = 3\n"), ("wrong type", "[model]\nn_hid = \"wide\"\n"),
                         ("negative width", "[model]\nn_hid = -16\n"), ("seed -1", "[train]\nseed = -1\n"),
                         ("invalid UTF-8", b"[train]\nsteps = 3 # \xff\n"), ("not TOML", "[train\n"),
                         ("unknown [sampling] for dvae", "[sampling]\ntemperature = 1.0\n"),
                         ("unknown parallel mode", "[train]\nparallel = \"zero3\"\n"),
                         ("fsdp without torchrun", "[train]\nparallel = \"fsdp\"\n")]],
    ("train: seed 2^63 - 1 (the largest TOML integer; valid)", 0,
     lambda w: ["train", "dvae", "--out", w / "out/run", "--config", _toml(w, "[train]\nseed = 9223372036854775807\n"),
                "--steps", "1", "--batch-size", "2"]),
    ("train: --lr nan", 2, lambda w: ["train", "dvae", "--out", w / "out/run", "--lr", "nan"]),
    ("train: --resume without a run", 2, lambda w: ["train", "dvae", "--out", w / "out/run", "--resume"]),
    ("train: unknown task", 2, lambda w: ["train", "gan", "--out", w / "out/run"]),
    ("train: dalle without --vae", 2, lambda w: ["train", "dalle", "--out", w / "out/run"]),
    ("train: unknown data spec", 2, lambda w: ["train", "dvae", "--data", "imagenet", "--out", w / "out/run"]),
    ("train: wds: pattern matching no file", 2,
     lambda w: ["train", "dvae", "--data", f"wds:{w}/none-{{0..3}}.tar", "--out", w / "out/run", "--steps", "1"]),
    ("data shards: --shard-size 0", 2, lambda w: ["data", "shards", "shapes", "--out", w / "out/shards", "--shard-size", "0"]),
    ("data shards: shards as the source", 2, lambda w: ["data", "shards", f"wds:{w}", "--out", w / "out/shards"]),
    ("export: a folder without a checkpoint", 2, lambda w: ["export", w / "out/none"]),
    ("bundle: --out is the run", 2, lambda w: ["bundle", _bundle(w), "--out", w / "bundle"]),
    ("bundle: --out is the parent", 2, lambda w: ["bundle", _bundle(w), "--out", w]),
    ("bundle: --out inside the run", 2, lambda w: ["bundle", _bundle(w), "--out", w / "bundle" / "inner"]),
    ("tokenizer encode: undecodable", 2,
     lambda w: ["tokenizer", "encode", "a \udcff", "--tokenizer", default_bundle() / "tokenizer.json"]),
]


def _snapshot(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*") if not p.is_fifo()}


def run_case(name: str, expected: int, make_argv) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "out").mkdir()
        argv = [str(a) for a in make_argv(work)]
        before = _snapshot(work)
        err = io.StringIO()
        tb = False
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse's own one-line usage errors
                code = e.code
            except BaseException:
                traceback.print_exc()
                code, tb = 1, True
        after = _snapshot(work)
        outside = sorted(k for k in set(after) ^ set(before) if not k.startswith("out"))
        changed = sorted(k for k in set(before) & set(after) if before[k] != after[k] and not k.startswith("out"))
        lost = [k for k in before if k not in after]
        message = err.getvalue().strip().splitlines()
        return {"name": name, "code": code, "expected": expected, "traceback": tb or "Traceback" in err.getvalue(),
                "outside": [k for k in outside + changed if k not in lost and k != "MARKER"], "lost": lost,
                "code_run": (work / "MARKER").exists(), "message": message[-1] if message else ""}


def main() -> int:
    torch.set_num_threads(1)
    results = [run_case(*case) for case in CASES]
    for r in results:
        flag = "ok " if r["code"] == r["expected"] and not r["traceback"] else "BAD"
        print(f"{flag} [{r['code']}] {r['name']}: {r['message'][:110]}")
    clean = sum(r["code"] == r["expected"] and not r["traceback"] for r in results)
    print()
    print("| cases | clean (expected status, one line) | tracebacks | written outside --out | data lost | code run on load |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(results)} | {clean} | {sum(r['traceback'] for r in results)} | "
          f"{sum(bool(r['outside']) for r in results)} | {sum(bool(r['lost']) for r in results)} | "
          f"{sum(r['code_run'] for r in results)} |")
    return 0 if clean == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
