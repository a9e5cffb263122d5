"""The README's shell examples, as tests read them: one home for finding a block."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(heading: str) -> list[str]:
    """The first indented block under `### {heading}`, its lines without the indent."""
    section = README.read_text().split(f"### {heading}\n", 1)[1]
    match = re.search(r"\n\n((?: {4}.*\n)+)", section)
    assert match, f"no indented block under ### {heading}"
    return [line[4:] for line in match.group(1).splitlines()]


def without_comments(lines: list[str]) -> list[str]:
    """Each line without its trailing `  # …` comment."""
    return [line.split("  #")[0].strip() for line in lines]
