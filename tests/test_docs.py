"""The README and docs/ hold together: every relative link and image in README.md and docs/*.md
resolves to a file of the repository (and a ``#anchor`` into a Markdown file to one of its headings,
GitHub-style), README.md stays a short page, and it opens with the two set-up commands, the test one
exactly as CI (``.ci/run``) runs it."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DEMO_COMMAND = "bash tools/setup.sh && .venv/bin/python tools/demo.py"
README_MAX_LINES = 300

# [text](target) and ![alt](target); the target may carry a "title".
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^()\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+).*?\1")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced and indented code blocks."""
    out, fenced, previous_blank, in_code = [], False, True, False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        indented = line.startswith(("    ", "\t")) and not line.lstrip().startswith(("- ", "* ", "|"))
        in_code = indented and (previous_blank or in_code)
        previous_blank = not line.strip()
        if fenced or in_code:
            continue
        out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text without markup, lower case, punctuation dropped,
    spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for _, line in prose(path.read_text()):
        match = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            if count:
                seen[f"{base}-{count}"] = 1
    return set(seen)


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    """What is wrong with each relative link and image of ``page`` (paths shown from ``root``)."""
    problems = []
    for number, line in prose(page.read_text()):
        for match in LINK.finditer(CODE_SPAN.sub("", line)):
            target = match.group(1)
            if EXTERNAL.match(target):
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / unquote(path_part)).resolve() if path_part else page
            where = f"{page.relative_to(root)}:{number}: {target}"
            if not dest.exists():
                problems.append(f"{where}: no such file {dest}")
            elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_image_resolves(page):
    assert broken_links(page) == []


def test_the_checks_see_a_broken_link_a_missing_image_and_a_wrong_anchor(tmp_path):
    docs = tmp_path / "docs"
    (docs / "figures").mkdir(parents=True)
    (docs / "figures/x.png").write_bytes(b"")
    (docs / "other.md").write_text("# Other page\n\n## Step 2: `run` it (CPU)\n\n## Step 2: `run` it (CPU)\n")
    page = docs / "page.md"
    page.write_text(
        "# Page\n\n"
        "Good: [other](other.md), [step](other.md#step-2-run-it-cpu), [again](other.md#step-2-run-it-cpu-1),\n"
        "[self](#page), ![fig](figures/x.png), [web](https://example.com/missing.md), `[code](nowhere.md)`.\n\n"
        "    [an indented code block](nowhere.md)\n\n"
        "Bad: [gone](gone.md), ![img](figures/y.png), [anchor](other.md#step-3),\n"
        "[from the repository root](docs/other.md).\n")
    problems = broken_links(page, root=tmp_path)
    assert [p.split(": ")[1] for p in problems] == ["gone.md", "figures/y.png", "other.md#step-3", "docs/other.md"]


def test_slugs_follow_github():
    assert slug("Video decoding (`p2r/data/video.py`)") == "video-decoding-p2rdatavideopy"
    assert slug("0. Protocols: which number you get") == "0-protocols-which-number-you-get"
    assert slug("The paper's analyses on your checkpoints (Tables 5 and 6)") == (
        "the-papers-analyses-on-your-checkpoints-tables-5-and-6")
    assert slug("Quick start (fresh machine, CPU, no downloads)") == "quick-start-fresh-machine-cpu-no-downloads"


def test_the_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < README_MAX_LINES, (
        f"README.md has {len(lines)} lines: keep it to what a newcomer needs and move the rest to docs/")


def ci_command() -> str:
    lines = [l.strip() for l in (REPO / ".ci/run").read_text().splitlines()]
    commands = [l for l in lines if l and not l.startswith("#") and not l.startswith(("set ", "cd "))]
    assert len(commands) == 1, f".ci/run should run one command, the README's test command: {commands}"
    return commands[0]


def test_the_readme_opens_with_the_two_set_up_commands_and_ci_runs_the_test_one():
    text = (REPO / "README.md").read_text()
    first_section = text[: text.index("\n## ", text.index("\n## ") + 1)]  # up to the section after the first
    assert first_section.splitlines()[0].startswith("# ")
    code = [line[4:] for line in first_section.splitlines() if line.startswith("    ") and line.strip()]
    assert code[:2] == [DEMO_COMMAND, ci_command()], (
        "README.md's Quick start must open with the demo command and then the test command, exactly as "
        f".ci/run runs it ({ci_command()!r}); found {code[:2]}")
