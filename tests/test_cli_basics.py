"""The command's own conventions: --version, python -m cvformers, names of the shipped parts."""

import subprocess
import sys

from cvformers import __version__


def test_version_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "cvformers", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"cvformers {__version__}"


def test_a_closed_pipe_is_not_a_traceback():
    code = ("import sys, cvformers.cli as c\n"

            "c._COMMANDS.append(lambda sub: sub.add_parser('spam').set_defaults(func=lambda a: [print('x' * 80) for _ in range(100000)]))\n"
            "sys.exit(c.main(['spam']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err


def test_help_states_defaults_including_the_shipped_models_sampling(capsys):
    import pytest

    from cvformers.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--num NUM images per prompt (default: 8)" in text
    assert "(default: 0)" in text  # --seed: a zero default is still stated
    assert "'default': temperature 0.5" in text and "'unclip': steps" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(default:" in capsys.readouterr().out
