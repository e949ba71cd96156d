"""Every relative link in README.md, docs/*.md and benchmarks/README.md resolves: the file exists and, for
``path#anchor`` (or ``#anchor``), the anchor is a heading of that file, slugged as GitHub slugs it.

Links inside fenced or inline code are not links and are not checked; links with a scheme (``https:``,
``mailto:``) are left to the reader. Fast and offline: it reads files only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")])

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def without_code(text: str) -> str:
    """The text with fenced blocks and inline code spans blanked (their lines kept, so line numbers hold)."""
    text = FENCE.sub(lambda match: "\n" * match.group(0).count("\n"), text)
    return INLINE_CODE.sub(lambda match: " " * len(match.group(0)), text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor in a markdown text; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(FENCE.sub("", text)):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(text: str, page: Path) -> list[str]:
    """Each relative link of ``text`` (the content of ``page``) that names no file, or no heading in it."""
    problems = []
    cleaned = without_code(text)
    for match in LINK.finditer(cleaned):
        target = match.group(1)
        if SCHEME.match(target):
            continue
        line = cleaned.count("\n", 0, match.start()) + 1
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.name}:{line}: {target}"
        if not resolved.exists():
            problems.append(f"{where}: no file {resolved}")
        elif anchor and resolved.suffix == ".md":
            target_text = text if resolved == page.resolve() else resolved.read_text(encoding="utf-8")
            if anchor.lower() not in anchors(target_text):
                problems.append(f"{where}: no heading #{anchor} in {resolved.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert page.is_file(), f"{page} is missing"
    problems = broken_links(page.read_text(encoding="utf-8"), page)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_a_missing_file_and_a_missing_heading_are_reported(tmp_path: Path) -> None:
    (tmp_path / "OTHER.md").write_text("# Other page\n\n## A section: with punctuation\n")
    page = tmp_path / "PAGE.md"
    text = (
        "# Page\n\n"
        "[fine](OTHER.md) [fine too](OTHER.md#a-section-with-punctuation) [here](#page)\n"
        "[gone](MISSING.md) [no such heading](OTHER.md#nowhere) [nor here](#nowhere)\n"
        "[web](https://example.com/x.md) `[in code](MISSING.md)`\n\n"
        "```\n[in a fence](MISSING.md)\n```\n"
    )
    page.write_text(text)
    problems = broken_links(text, page)
    assert len(problems) == 3, problems
    assert "PAGE.md:4: MISSING.md: no file" in problems[0]
    assert problems[1].endswith("no heading #nowhere in OTHER.md")
    assert problems[2].endswith("no heading #nowhere in PAGE.md")


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Debugger: the project's rules or SageMaker's service", "debugger-the-projects-rules-or-sagemakers-service"),
        (
            "Model registry (`{artifact_root}/registry/<group>/`, one group per endpoint)",
            "model-registry-artifact_rootregistrygroup-one-group-per-endpoint",
        ),
        ("Against TorchServe 0.12", "against-torchserve-012"),
        ("Profile `aws`", "profile-aws"),
    ],
)
def test_anchors_are_slugged_as_github_slugs_them(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor
