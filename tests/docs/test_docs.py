"""The documentation holds together: every relative link resolves (file and heading), the
section names the code cites exist, nothing points outside the repository, and every
``MORAM_*`` name used in the repository is documented in docs/backends.md."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "examples" / "README.md", ROOT / "benchmarks" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]

_LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*$", re.M)


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [ROOT / p for p in out.stdout.decode().split("\0") if p]


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None        # binary or unreadable: holds no reference


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8")))}


def links(path: Path) -> list[str]:
    return _LINK.findall(_FENCE.sub("", path.read_text(encoding="utf-8")))


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):        # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists() or ROOT not in (dest, *dest.parents):
            bad.append(f"{target} (no such file in the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading with anchor #{anchor} in {dest.name})")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    assert broken_links(page) == [], f"broken links in {page.relative_to(ROOT)}"


# section names cited in code and docs, e.g.  docs/op.md, "Backward"  or  docs/op.md ("Forward")
_CITE = re.compile(r"docs/(\w+\.md)[,\s(]{1,3}\"([^\"\n]+)\"")


def cited_sections(files) -> list[tuple[str, str, str]]:
    out = []
    for f in files:
        text = _text(f)
        if text:
            out += [(str(f.relative_to(ROOT)), page, name) for page, name in _CITE.findall(text)]
    return out


def test_cited_sections_exist():
    cites = cited_sections(_tracked_files())
    assert cites, "expected the code to cite docs/ sections by name"
    missing = [f"{src}: docs/{page} \"{name}\"" for src, page, name in cites
               if not (ROOT / "docs" / page).is_file() or slug(name) not in anchors(ROOT / "docs" / page)]
    assert missing == [], "cited sections with no such heading"


# Files that live outside the repository; the repository must cite docs/ instead. The
# names are assembled so that this file does not contain them.
FORBIDDEN = ["../" + "shared", "MORAM_OP" + ".md", "STYLE" + ".md", "KERNEL_NOTES" + ".md",
             "API" + ".md"]


def outside_references(files) -> list[str]:
    hits = []
    for f in files:
        rel = f.relative_to(ROOT).as_posix()
        if rel.startswith("examples/data/"):
            continue
        text = _text(f)
        if text:
            hits += [f"{rel}: {name}" for name in FORBIDDEN if name in text]
    return hits


def test_no_reference_outside_the_repository():
    assert outside_references(_tracked_files()) == []


_ENV_NAME = re.compile(r"\bMORAM_[A-Z0-9_]*[A-Z0-9]\b")


def moram_names(files) -> set[str]:
    names = set()
    for f in files:
        text = _text(f)
        if text:
            names.update(_ENV_NAME.findall(text))
    return names


def test_every_moram_name_is_documented():
    backends_md = ROOT / "docs" / "backends.md"
    this = Path(__file__).resolve()          # holds assembled names, not variables
    used = moram_names(f for f in _tracked_files() if f not in (backends_md, this))
    assert used, "expected MORAM_* names in the code"
    documented = set(_ENV_NAME.findall(backends_md.read_text(encoding="utf-8")))
    assert sorted(used - documented) == [], "MORAM_* names missing from docs/backends.md"
