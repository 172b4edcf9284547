"""Every command in README.md and docs/ still matches the command line: `train.py` lines compose (and pass the
config checks), sweep lines name a spec, rows, columns and arm sets it has and compose one cell with their
overrides, every other fisherbench command or script accepts each `--flag` the line uses (its `--help`).
Checked in this process (no subprocess per line), so docs cannot drift from the CLI unnoticed.

Lines that cannot be checked here are skipped by their first word, with the reason (`SKIP`); a command of any
other kind fails the test, so a new kind of command in the docs must be classified here."""
from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# first word (or `python <script>`) -> why the line is not checked here
SKIP = {
    "pip": "installs packages (network)",
    "git": "clones a repository (network)",
    "cd": "changes directory",
    ".": "activates a virtual environment",
    "source": "activates a virtual environment",
    "export": "sets environment variables",
    "wandb": "the W&B client (a server)",
    "pytest": "runs the test suite",
    "lint-imports": "runs the layer contract (CI)",
    "./run.sh": "an example folder's own script, tested by tests/examples",
    "examples/my_optimizer/run.sh": "an example folder's own script, tested by tests/examples",
    "python -m venv": "creates a virtual environment",
    "python -c": "a Python one-liner",
    "sbatch": "submits to SLURM",
    "torchrun": "starts several processes (its train.py overrides are checked as a train line)",
}
PLACEHOLDER = re.compile(r"<[^>]+>|\.\.\.")


def _doc_commands() -> list[tuple[str, int, str]]:
    """(file, line number, command) of every command line of the fenced bash blocks."""
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
            first = text[: m.start(1)].count("\n") + 1
            lines = m.group(1).split("\n")
            i = 0
            while i < len(lines):
                start, line = i, lines[i]
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i]
                i += 1
                for part in re.split(r"\s(?:&&|;|\|\|?)\s", line):
                    if part.strip() and not part.strip().startswith("#"):
                        out.append((path.relative_to(REPO).as_posix(), first + start, part.strip()))
    return out


COMMANDS = _doc_commands()


def _tokens(command: str) -> list[str]:
    tokens = shlex.split(command, comments=True)
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if tokens and tokens[0] == "torchrun":  # check the train.py part
        script = next((i for i, t in enumerate(tokens) if t.endswith("train.py")), None)
        tokens = ["python", *tokens[script:]] if script is not None else tokens
    return tokens


def _kind(tokens: list[str]) -> tuple[str, list[str]]:
    """(what the command is, its arguments)."""
    if tokens[:2] == ["python", "train.py"]:
        return "train", tokens[2:]
    for prefix in (["python", "-m", "fisherbench"], ["fisherbench"]):
        if tokens[: len(prefix)] == prefix and len(tokens) > len(prefix):
            verb, rest = tokens[len(prefix)], tokens[len(prefix) + 1:]
            return ("train" if verb == "train" else "sweep" if verb == "sweep" else f"verb:{verb}"), rest
    if tokens[:3] == ["python", "-m", "fisherbench.sweep"]:
        return "sweep", tokens[3:]
    if tokens[:2] == ["python", "-m"] and tokens[2].startswith("fisherbench."):
        return f"module:{tokens[2]}", tokens[3:]
    if tokens[0] == "python" and len(tokens) > 1 and tokens[1].endswith(".py"):
        return f"script:{tokens[1]}", tokens[2:]
    return "other", tokens


def _skip_reason(tokens: list[str]) -> str | None:
    for key, why in SKIP.items():
        words = key.split()
        if tokens[: len(words)] == words:
            return why
    return None


# ---------------------------------------------------------------------------------------------- train
def _train_overrides(args: list[str]) -> tuple[list[list[str]], str | None]:
    """Every job's overrides of a train.py line (a multirun expanded), or a reason it is not composed."""
    from fisherbench import train

    if any(a in ("--help", "-h") for a in args):
        return [], "asks for --help"
    if any(a.startswith("--config-dir") or a in ("-cd",) for a in args):
        return [], "needs the user's config folder"
    command = train._command_overrides(args)
    if command is None:
        return [], f"uses a Hydra flag left to Hydra: {args}"
    overrides, multirun = command
    if any(PLACEHOLDER.search(o) for o in overrides):
        return [], "has a placeholder"
    if not multirun:
        return [overrides], None
    _, jobs = train._multirun_plan(overrides)
    return (jobs or [])[:8], None


def _check_train(args: list[str]) -> str | None:
    from fisherbench.core.config import validate
    from fisherbench.engine.compose import compose_config

    jobs, reason = _train_overrides(args)
    for overrides in jobs:
        validate(compose_config(overrides))
    return reason


# ---------------------------------------------------------------------------------------------- sweeps
@lru_cache(maxsize=None)
def _spec(name: str):
    from fisherbench.sweep.spec import load_spec

    return load_spec(name)


def _check_sweep(args: list[str]) -> str | None:
    from fisherbench.engine.compose import compose_config
    from fisherbench.sweep.cli import _csv, build_parser
    from fisherbench.sweep.expand import cell_overrides

    if any(PLACEHOLDER.search(a) for a in args):
        return "has a placeholder"
    if any(a.startswith("--config-dir") for a in args):
        return "needs the user's config folder"
    parsed = build_parser().parse_intermixed_args(args)  # unknown flags and bad values fail here
    if parsed.list or not parsed.spec:
        return None
    spec = _spec(parsed.spec)
    cells = spec.cells(_csv(parsed.arms) or ["main"], _csv(parsed.rows), _csv(parsed.columns))
    assert cells, f"no cells selected by {args}"
    user = [o for o in parsed.overrides if not o.startswith("hydra.")]
    compose_config(cell_overrides(spec, cells[0], parsed.wct, user))  # the user's overrides compose on a cell
    return None


# ---------------------------------------------------------------------------------------------- --help
@lru_cache(maxsize=None)
def _help_text(kind: str, sub: str | None) -> str:
    """The --help text of a fisherbench verb, module or script (run in this process)."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if kind.startswith("verb:"):
                from fisherbench.__main__ import main

                sys.argv = ["fisherbench"]
                main([kind[5:], *([sub] if sub else []), "--help"])
            elif kind.startswith("module:"):
                sys.argv = [kind[7:], *([sub] if sub else []), "--help"]
                runpy.run_module(kind[7:], run_name="__main__", alter_sys=False)
            else:
                script = REPO / kind[7:]
                sys.argv = [str(script), *([sub] if sub else []), "--help"]
                sys.path.insert(0, str(script.parent))
                try:
                    runpy.run_path(str(script), run_name="__main__")
                finally:
                    sys.path.remove(str(script.parent))
        except SystemExit as exc:
            assert exc.code in (0, None), f"{kind} {sub or ''} --help exited {exc.code}: {err.getvalue()[-500:]}"
        finally:
            sys.argv = argv
    return out.getvalue() + err.getvalue()


def _check_flags(kind: str, args: list[str]) -> str | None:
    sub = args[0] if args and not args[0].startswith("-") and kind in (
        "verb:results", "module:fisherbench.results") else None
    text = _help_text(kind, sub)
    assert "usage" in text.lower(), f"{kind}: --help printed no usage"
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    unknown = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    assert not unknown, f"{kind} {sub or ''}: the docs use {unknown}, which --help does not list"
    return None


@pytest.mark.parametrize("where, lineno, command", COMMANDS, ids=[f"{w}:{n}" for w, n, _ in COMMANDS])
def test_documented_command_matches_the_cli(where, lineno, command):
    tokens = _tokens(command)
    if not tokens:
        return
    reason = _skip_reason(tokens)
    if reason:
        pytest.skip(reason)
    kind, args = _kind(tokens)
    if kind == "train":
        reason = _check_train(args)
    elif kind == "sweep":
        reason = _check_sweep(args)
    elif kind.startswith(("verb:", "module:", "script:")):
        if kind.startswith("script:") and not (REPO / kind[7:]).is_file():
            pytest.fail(f"{where}:{lineno}: {kind[7:]} does not exist")
        reason = _check_flags(kind, args)
    else:
        pytest.fail(f"{where}:{lineno}: `{command}` is a kind of command this test does not know; check it here "
                    "or add its first word to SKIP with the reason")
    if reason:
        pytest.skip(reason)


def test_the_docs_have_commands_to_check():
    kinds = {_kind(_tokens(c))[0] for _, _, c in COMMANDS if _tokens(c)}
    assert {"train", "sweep"} <= kinds and len(COMMANDS) > 50
