"""The documentation stands on the repository's own files: every relative link in the README and
docs/ resolves (file and, for a Markdown target, heading anchor); no file cites a document that is
not in the repository (a design note, a docs/*.md that does not exist, a section of one that it
does not have); CI runs the README's test command."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "data" / "README.md", *(ROOT / "docs").glob("*.md")])
# Where a citation of a document may hide: code, docs, configs, build and CI files.
CITING = [ROOT / "README.md", ROOT / "Makefile", ROOT / ".ci" / "run"] + sorted(
    p
    for folder in ("src", "docs", "tests", "experiments", "data")
    for p in (ROOT / folder).rglob("*")
    if p.is_file() and p.suffix in {".py", ".md", ".yaml", ".yml", ".sbatch", ".toml", ".txt"}
)

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and code spans, where brackets are not links."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces → '-'."""
    text = re.sub(r"`|\*\*|__", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = text.strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor GitHub gives ``page``'s headings (a repeated heading gets -1, -2, …)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(page: Path) -> list[str]:
    return [
        target
        for target in _LINK.findall(_prose(page.read_text(encoding="utf-8")))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


def test_the_pages_exist_and_the_readme_links_every_doc() -> None:
    readme = set(relative_links(ROOT / "README.md"))
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in {t.split("#")[0] for t in readme}, (
            f"README.md does not link docs/{page.name}"
        )


def test_slug_matches_github() -> None:
    assert slug("8. A protocol that can decide: `protocol=fixed`, controls, `make benchmark`") == (
        "8-a-protocol-that-can-decide-protocolfixed-controls-make-benchmark"
    )
    assert slug("Recipes: `tmerge merge`") == "recipes-tmerge-merge"
    assert slug("What the embedded BraTS-like target can (audit at a518ea7)") == (
        "what-the-embedded-brats-like-target-can-audit-at-a518ea7"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_no_file_cites_a_document_outside_the_repository() -> None:
    design = "design" + " §"  # spelt apart so that this file does not match itself
    cited = re.compile(r"\bdocs/([\w.-]+\.md)(?:\s+§\s*(\d+))?")
    wrong = []
    for path in CITING:
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT)
        for n, line in enumerate(text.splitlines(), 1):
            if design in line:
                wrong.append(f"{name}:{n}: cites a design document that is not in the repository")
            for doc, section in cited.findall(line):
                target = ROOT / "docs" / doc
                if not target.is_file():
                    wrong.append(f"{name}:{n}: docs/{doc} does not exist")
                elif section and not any(a.startswith(f"{section}-") for a in anchors(target)):
                    wrong.append(f"{name}:{n}: docs/{doc} has no section {section}")
    assert not wrong, "\n".join(wrong)


def test_ci_runs_the_readme_test_command() -> None:
    ci = [
        line.split("#")[0].strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip().startswith("make ")
    ]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "make test" in ci, ".ci/run must run the README's test command, make test"
    for command in ci:
        assert re.search(rf"^{re.escape(command)}(\s|$)", readme, re.M), (
            f"README.md does not show {command!r}"
        )
        target = command.split()[1]
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"Makefile has no target {target!r}"


def test_the_architecture_map_names_every_module() -> None:
    """docs/architecture.md's module map names every top-level module and package of src/tmerge."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    fence = _FENCE.search(text)
    assert fence, "docs/architecture.md has no module map"
    package = ROOT / "src" / "tmerge"
    names = [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
    names += [f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()]
    missing = [n for n in sorted(names) if not re.search(rf"(?<![\w/]){re.escape(n)}", fence.group(0))]
    assert not missing, f"docs/architecture.md's module map does not name: {', '.join(missing)}"
