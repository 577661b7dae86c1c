"""Every citation of the design doc names a section that exists in docs/DESIGN.md.

Code and notes cite the doc as `DESIGN.md, "Backward"`, `DESIGN.md "Backward"`, `DESIGN.md ("Benchmarks")` or
`DESIGN.md, section "Numerics"` (with or without the `docs/` prefix; the quoted title may continue on the next
line). A citation that names no section must say where the doc is: `docs/DESIGN.md`.
"""
from __future__ import annotations

import os
import pathlib
import re

import pytest

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
DESIGN_DOC = REPOSITORY / "docs" / "DESIGN.md"
#: Files that may mention the doc without citing a section of it: the doc itself and this test.
NOT_CITATIONS = {DESIGN_DOC, pathlib.Path(__file__).resolve()}
SKIPPED_DIRECTORIES = {"__pycache__", "build", "dist", "runs", "node_modules"}

_DOC_NAME = "DESIGN.md"
_QUOTES = "\"“”"
# After the name: optional 's, punctuation, "section", an opening parenthesis, then one or more quoted titles
# ("A" and "B", "A", "B").
_LEAD = re.compile(r"""^(?:'s)?\s*[,:]?\s*(?:sections?\s+)?\(?\s*(?=["“])""")
_TITLE = re.compile(r"""["“]([^"“”]+)["”]""")
_BETWEEN_TITLES = re.compile(r"""^\s*(?:,|and|&|,\s*and)?\s*(?=["“])""")
# What a continuation line starts with in a comment or a Markdown quote.
_CONTINUATION_PREFIX = re.compile(r"^\s*(?:#:?|//|>|\*)?\s*")
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def doc_headings(text: str) -> set[str]:
    """The titles of the `#`-headings of a Markdown text (lines inside fenced code blocks are not headings)."""
    headings, fenced = set(), False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        found = None if fenced else _HEADING.match(line)
        if found:
            headings.add(found.group(2).strip())
    return headings


def cited_titles(after: str) -> list[str]:
    """The quoted section titles that directly follow a mention of the doc (`after` = the rest of its line, a space
    and the next line); [] when the mention names none."""
    lead = _LEAD.match(after)
    if not lead:
        return []
    titles, rest = [], after[lead.end():]
    while True:
        title = _TITLE.match(rest)
        if not title:
            return titles
        titles.append(" ".join(title.group(1).split()))  # a title broken over two lines has one space there
        rest = rest[title.end():]
        between = _BETWEEN_TITLES.match(rest)
        if not between:
            return titles
        rest = rest[between.end():]


def citations(text: str) -> list[tuple[int, str, bool, list[str]]]:
    """Every mention of the doc in `text`: (line number, the line, says docs/DESIGN.md, cited titles)."""
    lines = text.splitlines()
    found = []
    for number, line in enumerate(lines):
        for mention in re.finditer(re.escape(_DOC_NAME), line):
            following = lines[number + 1] if number + 1 < len(lines) else ""
            after = line[mention.end():].rstrip() + " " + _CONTINUATION_PREFIX.sub("", following, count=1)
            with_folder = line[:mention.start()].endswith("docs/")
            found.append((number + 1, line.strip(), with_folder, cited_titles(after)))
    return found


def problems(text: str, headings: set[str], where: str) -> list[str]:
    """What is wrong with the citations in `text`: titles that are not headings, and bare mentions without the
    docs/ folder."""
    wrong = []
    for number, line, with_folder, titles in citations(text):
        if not titles and not with_folder:
            wrong.append(f"{where}:{number}: cites DESIGN.md without a section; say docs/DESIGN.md or name a "
                         f"section: {line}")
        for title in titles:
            if title not in headings:
                wrong.append(f"{where}:{number}: no section {title!r} in docs/DESIGN.md: {line}")
    return wrong


def citing_files() -> list[pathlib.Path]:
    """The repository's *.py and *.md files (not .git, build output, virtual environments or run output)."""
    files = []
    for folder, directories, names in os.walk(REPOSITORY):
        directories[:] = sorted(
            name for name in directories
            if not name.startswith(".") and name not in SKIPPED_DIRECTORIES and not name.endswith(".egg-info")
            and not (pathlib.Path(folder, name) / "pyvenv.cfg").exists()
        )
        for name in sorted(names):
            path = pathlib.Path(folder, name)
            if path.suffix in (".py", ".md") and path.resolve() not in NOT_CITATIONS:
                files.append(path)
    return files


def test_design_doc_exists_with_the_sections_the_code_cites():
    assert DESIGN_DOC.is_file(), "docs/DESIGN.md is missing"
    headings = doc_headings(DESIGN_DOC.read_text(encoding="utf-8"))
    for title in ("The operation", "Layout", "Public API", "Forward kernel", "Backward", "Decoding", "CPU backend",
                  "Numerics", "Tests", "Performance you can check without a GPU", "Benchmarks"):
        assert title in headings, f"docs/DESIGN.md has no section {title!r}"


def test_every_citation_names_an_existing_section():
    headings = doc_headings(DESIGN_DOC.read_text(encoding="utf-8"))
    wrong, count = [], 0
    for path in citing_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        count += len(citations(text))
        wrong += problems(text, headings, str(path.relative_to(REPOSITORY)))
    assert count > 0, "found no citation of DESIGN.md at all: is the search broken?"
    assert not wrong, "\n".join(wrong)


def test_readme_points_at_docs_design_md():
    readme = (REPOSITORY / "README.md").read_text(encoding="utf-8")
    found = citations(readme)
    assert found, "README.md does not cite the design doc"
    assert all(with_folder for _, _, with_folder, _ in found), \
        "README.md must cite the design doc as docs/DESIGN.md"
    assert "(docs/DESIGN.md" in readme, "README.md should link to docs/DESIGN.md"


# The checker itself: it must accept every citation form in use and reject what is wrong.
HEADINGS = {"Backward", "Benchmarks", "Performance you can check without a GPU"}


@pytest.mark.parametrize("text, titles", [
    ('see DESIGN.md, "Backward" for the math', ["Backward"]),
    ('see DESIGN.md "Backward")', ["Backward"]),
    ('named shapes (DESIGN.md ("Benchmarks")) here', ["Benchmarks"]),
    ('DESIGN.md, section "Benchmarks"', ["Benchmarks"]),
    ("DESIGN.md's \"Backward\" and \"Benchmarks\"", ["Backward", "Benchmarks"]),
    ('the issue model of DESIGN.md, "Performance you\ncan check without a GPU"; more', [
        "Performance you can check without a GPU"]),
    ('the issue model of docs/DESIGN.md\n("Performance you can check without a GPU"); the figures', [
        "Performance you can check without a GPU"]),
    ('#: the shapes of DESIGN.md\n#: ("Benchmarks") as (B, T, S, A)', ["Benchmarks"]),
])
def test_checker_reads_every_citation_form(text, titles):
    (found,) = citations(text)
    assert found[3] == titles
    assert problems(text, HEADINGS, "example") == []


@pytest.mark.parametrize("text", [
    'see DESIGN.md, "Backwards"',  # a made-up heading
    'see DESIGN.md ("No such section")',
    "the prototype numbers of DESIGN.md",  # bare, and not docs/DESIGN.md
    "(DESIGN.md): forward",
])
def test_checker_rejects_bad_citations(text):
    assert problems(text, HEADINGS, "example")


def test_checker_accepts_a_bare_citation_with_the_folder():
    assert problems("Design notes: [docs/DESIGN.md](docs/DESIGN.md).", HEADINGS, "example") == []


def test_headings_ignore_code_blocks():
    text = "# Title\n## Backward\n```bash\n# not a heading\n```\n### Numerics ###\n"
    assert doc_headings(text) == {"Title", "Backward", "Numerics"}
