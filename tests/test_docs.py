"""The README and docs/*.md: every Python snippet of the README runs as written, every relative link leads somewhere.

Each snippet runs in a fresh interpreter of its own (nothing defined by another snippet or by the test session),
offline. A relative link must name a file or folder inside this repository; a `#anchor` on a markdown file must
name one of its headings, spelled as GitHub spells heading anchors.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def python_snippets(path: pathlib.Path) -> list[str]:
    return [body for language, body in FENCE.findall(path.read_text()) if language == "python"]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are code, not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchors(path: pathlib.Path) -> set[str]:
    """The heading anchors GitHub makes for a markdown file: lower case, punctuation dropped, spaces to hyphens."""
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(path: pathlib.Path) -> list[str]:
    return [target for target in LINK.findall(prose(path.read_text())) if not SCHEME.match(target)]


def test_the_readme_has_the_three_snippets():
    snippets = python_snippets(README)
    for name in ("patch_convit", "FusedGPSA", "gpsa_attention"):
        assert any(name in snippet for snippet in snippets), name


@pytest.mark.parametrize("index", range(len(python_snippets(README))))
def test_readme_snippet_runs(index):
    snippet = python_snippets(README)[index]
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # a snippet that would download something fails instead
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, f"README.md snippet {index + 1}:\n{snippet}\n{output}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        location, _, anchor = target.partition("#")
        resolved = (page.parent / location).resolve() if location else page
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(f"{target}: no such file in the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_check_sees_links():
    """The checks above are not vacuous: the README links to every docs page, and anchors are found."""
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    assert set(PAGES[1:]) <= linked, sorted(str(p.relative_to(ROOT)) for p in set(PAGES[1:]) - linked)
    assert "what-auto-picks" in anchors(ROOT / "docs" / "backends.md")
