"""`python -m fisherbench <verb>`: one entry point for every command, cheap to ask for help."""
import subprocess
import sys

from fisherbench.__main__ import VERBS, main


def test_help_lists_every_verb(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(verb in out for verb in VERBS)


def test_unknown_verb_is_a_usage_error(capsys):
    assert main(["trian"]) == 2
    assert "unknown verb 'trian'" in capsys.readouterr().err


def test_version_comes_from_the_package(capsys):
    import fisherbench

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fisherbench {fisherbench.__version__}"


def test_module_runs_a_verb(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fisherbench", "sweep", "--list"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "table2_cifar10" in out.stdout, out.stderr


def test_a_closed_pipe_is_not_a_traceback(tmp_path):
    """`fisherbench sweep --list | head -1`: the reader leaves early; the command ends quietly."""
    proc = subprocess.run(f"{sys.executable} -m fisherbench sweep --list | head -1", shell=True, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
