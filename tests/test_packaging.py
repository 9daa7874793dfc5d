"""What the distributions hold: the sdist can run the tests and rebuild the models; the wheel is small."""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="needs the source tree")
def test_sdist_holds_what_the_tests_import_and_the_recipes(tmp_path):
    pytest.importorskip("build")
    done = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path),
                           str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SetuptoolsDeprecationWarning" not in done.stderr + done.stdout  # e.g. a license table setuptools retires
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    imported_by_tests = {"tests/conftest.py", "tests/image_toys.py", "tests/trainer_toys.py"}
    assert imported_by_tests <= names
    tracked = subprocess.run(["git", "ls-files", "configs", "scripts", "tests"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert tracked and set(tracked) <= names  # every recipe, rebuild script and test
    assert {"LICENSE", "constraints/cpu.txt", "src/cvformers/assets/default/model.safetensors"} <= names
    assert not any("__pycache__" in n for n in names)
