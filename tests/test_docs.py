"""The documentation stands on its own: no pointers to documents a user does not have, links that resolve, and
a README short enough to read."""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# built from parts so that this file does not match itself
FORBIDDEN = re.compile("|".join(["shared/" + "spec", "spec " + "§", "official " + "§", "design " + "card"]))
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ""}


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = [REPO / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file outside caches/venvs
        files = [p for p in REPO.rglob("*") if p.is_file()
                 and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(REPO).parts)]
    return [p for p in files if p.suffix in TEXT_SUFFIXES and p.is_file()]


def test_no_references_to_documents_users_do_not_have():
    hits = []
    for path in _tracked_files():
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(REPO)}:{i}: {line.strip()[:100]}")
    assert not hits, "state the fact itself instead of citing an unpublished document:\n" + "\n".join(hits)


def test_readme_is_short():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) <= 20_000 and len(text.splitlines()) <= 200


@pytest.mark.parametrize("page", sorted(p.name for p in (REPO / "docs").glob("*.md")) + ["../README.md"])
def test_relative_links_resolve(page):
    path = (REPO / "docs" / page).resolve()
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (path.parent / target).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(REPO)} links to missing files: {broken}"
