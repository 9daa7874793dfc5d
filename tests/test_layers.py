"""The package's layers only point down (docs/design.md): the import-linter contract in pyproject.toml."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_imports_only_point_down(capsys):
    lint = pytest.importorskip("importlinter.cli", reason="import-linter is in the [dev] extra")
    status = lint.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert status == 0, report


def test_the_contract_catches_an_upward_import(tmp_path, capsys):
    """A copy of the package with one model importing a pipeline breaks the contract."""
    import shutil
    import sys

    lint = pytest.importorskip("importlinter.cli")
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "cvformers", copy / "cvformers", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    vit = copy / "cvformers" / "models" / "vit.py"
    vit.write_text(vit.read_text() + "\nfrom cvformers.pipelines import text_to_image  # noqa\n")
    sys.path.insert(0, str(copy))
    saved = {k: v for k, v in sys.modules.items() if k == "cvformers" or k.startswith("cvformers.")}
    for k in saved:
        del sys.modules[k]
    try:
        status = lint.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    finally:
        sys.path.remove(str(copy))
        for k in [k for k in sys.modules if k == "cvformers" or k.startswith("cvformers.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    assert status == 1
    assert "cvformers.models.vit -> cvformers.pipelines.text_to_image" in capsys.readouterr().out
