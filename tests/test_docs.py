"""The documents a reader follows: every relative link of the README and the docs leads to a file
that exists, and every #anchor to a heading of it; and the README stays a user's page."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "bench" / "README.md",
             ROOT / "examples" / "paper" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text):
    """The text outside fenced code blocks and inline code."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return out


def anchors(path):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    for line in prose(path.read_text()):
        m = re.match(r"#+ (.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            found.add(slug)
    return found


def links(path):
    for line in prose(path.read_text()):
        for target in LINK.findall(line):
            if not re.match(r"[a-z]+:", target):
                yield target


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(document):
    broken = []
    for target in links(document):
        file, _, anchor = target.partition("#")
        dest = (document.parent / file).resolve() if file else document
        if not dest.exists():
            broken.append(f"{target}: no {dest.relative_to(ROOT)}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{document.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# Here\n")
    page.write_text("[a](there.md#here) [b](missing.md) [c](there.md#nowhere) `[d](x.md)`\n")
    assert list(links(page)) == ["there.md#here", "missing.md", "there.md#nowhere"]
    assert anchors(tmp_path / "there.md") == {"here"}


def test_the_readme_is_a_users_page():
    # Sections a user looks for, in about 250 lines; the lab notebook lives in docs/ and bench/.
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 260
    headings = [line[3:] for line in prose(text) if line.startswith("## ")]
    for wanted in ("Install", "Use", "Options", "Backends", "Performance", "Benchmark and tests",
                   "Limitations", "Cite", "Development"):
        assert wanted in headings
    assert headings.index("Use") < headings.index("Performance")
