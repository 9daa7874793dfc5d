"""Bad input gets one line and exit status 2, loses nothing, writes nothing outside --out.

Each test is a case a probe of the CLI found (a traceback, a silent wrong output); the fuzz
tests at the end drive argument parsing, config loading and prompt encoding with random values.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trainer_toys  # noqa: F401  (registers the "toy" task)
from cvformers import cli
from cvformers.config import dumps_toml
from cvformers.errors import UserError


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# --- generate -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "sampling.temperature must be a finite number"),
    (["--guidance", "inf"], "sampling.guidance must be a finite number"),
    (["--top-p", "0"], "sampling.top_p must be in (0, 1]"),
    (["--top-k", "-3"], "sampling.top_k must be an integer >= 0"),
    (["--seed", str(2**64)], "sampling.seed must be an integer in [0, 2^64)"),
    (["--candidates", "-1"], "sampling.candidates must be an integer >= 0"),
])
def test_bad_sampling_flags_are_one_line(tmp_path, capsys, flags, message):
    code, err = run(["generate", "a red circle", "--num", "1", "--out", tmp_path / "g.png", *flags], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_bad_device_and_undecodable_prompt(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "a red circle", "--device", "banana", "--out", str(tmp_path / "g.png")])
    assert e.value.code == 2 and "is not a device" in capsys.readouterr().err
    code, err = run(["generate", "a red \udcff circle", "--out", tmp_path / "g.png"], capsys)
    assert code == 2 and "not valid Unicode" in err


def test_out_that_is_a_directory_or_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_bytes(b"")
    for out in (tmp_path, tmp_path / "file" / "g.png"):
        code, err = run(["generate", "a red circle", "--num", "1", "--out", out], capsys)
        assert code == 2 and "cannot write" in err
    assert files_under(tmp_path) == {"file"}


def test_sampling_settings_object_is_checked_once():
    from cvformers.models.dalle_sampling import SamplingConfig

    base = SamplingConfig(guidance=2.0)
    assert base.override(temperature=None, seed=5) == SamplingConfig(guidance=2.0, seed=5)
    with pytest.raises(ValueError, match="unknown sampling setting"):
        base.override(temprature=0.5)
    with pytest.raises(ValueError, match="finite"):
        SamplingConfig(temperature=float("nan"))


# --- configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("toml, message", [
    ("[trian]\nsteps = 3\n", "unknown table [trian] for task toy; did you mean [train]?"),
    ("[sampling]\ntemperature = 0.5\n", "unknown table [sampling]"),
    ("model = 5\n", "[model] must be a table"),
    ("[train]\nlr = nan\n", "train.lr: expected a finite number"),
    ("[train]\nlr = -1.0\n", "train.lr must be in (0, 10]"),
    ("[train]\nbetas = [0.9, 1.5]\n", "train.betas must be two numbers in [0, 1)"),
    ("[train]\nweight_decay = -0.1\n", "train.weight_decay"),
    ("[train]\nstesp = 3\n", "did you mean train.steps?"),
    ("[model]\nhidden = \"wide\"\n", "model.hidden: expected an integer"),
    ("[train]\nparallel = \"zero3\"\n", "train.parallel: 'zero3' is not one of ['ddp', 'fsdp']"),
    ("[train]\nparallel = \"fsdp\"\n", "launch with torchrun"),
])
def test_bad_training_configs_are_refused_before_anything_is_written(tmp_path, capsys, toml, message):
    config = tmp_path / "exp.toml"
    config.write_text(toml)
    out = tmp_path / "run"
    code, err = run(["train", "toy", "--out", out, "--config", config], capsys)
    assert code == 2 and message in err, err
    assert not out.exists() or files_under(out) <= {".lock"}


def test_bad_learning_rate_flag(tmp_path, capsys):
    code, err = run(["train", "toy", "--out", tmp_path / "run", "--lr", "nan"], capsys)
    assert code == 2 and "train.lr" in err


def test_invalid_utf8_config(tmp_path, capsys):
    config = tmp_path / "exp.toml"
    config.write_bytes(b"[train]\nsteps = 3 # \xff\n")
    code, err = run(["train", "toy", "--out", tmp_path / "run", "--config", config], capsys)
    assert code == 2 and "not UTF-8" in err


def test_unknown_sampling_key_in_a_run_is_refused(tmp_path, capsys):
    import shutil

    from cvformers.config import load_toml, save_toml
    from cvformers.pipelines.text_to_image import default_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle(), bundle)
    cfg = load_toml(bundle / "config.toml")
    cfg.setdefault("sampling", {})["temprature"] = 0.5
    save_toml(cfg, bundle / "config.toml")
    code, err = run(["generate", "a red circle", "--model", bundle, "--out", tmp_path / "g.png"], capsys)
    assert code == 2 and "sampling.temprature" in err and "did you mean sampling.temperature" in err


def test_weights_with_nan_are_refused_naming_the_tensor(tmp_path):
    from trainer_toys import ToyConfig, ToyRegressor

    from cvformers.loading import load_weights, save_weights

    model = ToyRegressor(ToyConfig())
    with torch.no_grad():
        model.head.weight[0, 3] = float("nan")
    save_weights(model, tmp_path / "w.safetensors")
    with pytest.raises(UserError, match="head.weight holds NaN"):
        load_weights(ToyRegressor(ToyConfig()), tmp_path / "w.safetensors")


# --- fuzz ----------------------------------------------------------------------------------------

_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70))
_flag_values = st.one_of(_numbers.map(str), st.text(max_size=8))


# --num and --candidates get small values: a valid request for a million images is slow, not wrong
_count_values = st.one_of(st.integers(-3, 12).map(str), st.text(max_size=4), st.just("1e3"), st.just("nan"))
_flags = st.one_of(
    st.tuples(st.sampled_from(["--temperature", "--top-k", "--top-p", "--guidance", "--seed", "--prompt-rows"]),
              _flag_values),
    st.tuples(st.sampled_from(["--candidates", "--num"]), _count_values),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=st.lists(_flags, max_size=3), prompt=st.text(max_size=30))
def test_fuzz_generate_flags_and_prompts(tmp_path_factory, capsys, flags, prompt):
    work = tmp_path_factory.mktemp("gen")
    out = work / "out" / "g.png"
    argv = ["generate", prompt, "--out", str(out), "--num", "1", *[x for pair in flags for x in pair]]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse refusing a flag's type: its own one-line usage error
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err
    assert files_under(work) <= {"out", "out/g.png", "out/g.scores.json"}


_keys = st.sampled_from(["steps", "lr", "batch_size", "seed", "betas", "warmup_steps", "grad_clip", "hidden",
                         "dim", "dropout", "name", "spec", "amp", "eval_every", "bogus"])
_values = st.one_of(_numbers, st.booleans(), st.text(max_size=6), st.lists(_numbers, max_size=3))
_tables = st.dictionaries(st.sampled_from(["train", "model", "data", "trian", "sampling"]),
                          st.one_of(st.dictionaries(_keys, _values, max_size=3), _values), max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=_tables)
def test_fuzz_training_configs(tmp_path_factory, capsys, table):
    work = tmp_path_factory.mktemp("cfg")
    try:
        text = dumps_toml(table)
    except (ValueError, TypeError):
        return  # not writable as TOML (a huge integer): nothing a user can hand in
    (work / "exp.toml").write_text(text)
    table_train = table.get("train") if isinstance(table.get("train"), dict) else {}
    if isinstance(table_train.get("steps"), int) and table_train["steps"] > 50:
        return  # a valid but long run: not what this test is for
    if isinstance(table_train.get("batch_size"), int) and table_train["batch_size"] > 64:
        return
    code = cli.main(["train", "toy", "--out", str(work / "run"), "--config", str(work / "exp.toml"), "--steps", "2"])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err
    assert set(os.listdir(work)) <= {"exp.toml", "run"}  # nothing beside the run folder


def test_a_config_that_does_not_fit_its_weights_is_refused_before_allocating(tmp_path, capsys):
    """A crafted config.toml (a model 10^5 times the size of its file, a negative width) is
    compared with the weight file's header on the meta device: one line, nothing allocated."""
    import shutil

    from cvformers.config import load_toml, save_toml
    from cvformers.pipelines.text_to_image import default_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle(), bundle)
    cfg = load_toml(bundle / "config.toml")
    for change, message in (({"dim": 65536, "depth": 64}, "do not belong together"),
                            ({"dim": -192}, "does not describe a buildable dalle")):
        save_toml({**cfg, "model": {**cfg["model"], **change}}, bundle / "config.toml")
        code, err = run(["generate", "a red circle", "--model", bundle, "--out", tmp_path / "g.png"], capsys)
        assert code == 2 and message in err, err
    save_toml({**cfg, "kind": 5}, bundle / "config.toml")
    code, err = run(["generate", "a red circle", "--model", bundle, "--out", tmp_path / "g.png"], capsys)
    assert code == 2 and "unknown model kind 5" in err


def test_a_refused_out_leaves_no_scores_file_beside_it(tmp_path, capsys):
    """The shipped model reranks, so generate writes scores beside the PNG: only after the PNG."""
    os.mkfifo(tmp_path / "pipe")
    code, err = run(["generate", "a red circle", "--num", "1", "--out", tmp_path / "pipe"], capsys)
    assert code == 2 and "not a regular file" in err
    assert sorted(os.listdir(tmp_path)) == ["pipe"]
