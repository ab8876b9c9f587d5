"""Print the README's settings table from shared.settings.Settings (one source of truth).

Usage: python scripts/settings_table.py [--write]   (--write updates README.md in place;
tests/unit/test_docs.py checks the README holds the current table)
"""

from __future__ import annotations

import sys
from pathlib import Path

from shared.settings import Settings

START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def settings_table() -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for field in Settings.model_fields.values():
        env, _, meaning = (field.description or "").partition(": ")
        default = field.default
        shown = "(empty)" if default in (None, "") else f"`{default}`"
        lines.append(f"| `{env}` | {shown} | {meaning} |")
    return "\n".join(lines)


def write_readme(readme: Path) -> None:
    text = readme.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    readme.write_text(text[:start] + "\n" + settings_table() + "\n" + text[end:])


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_readme(Path(__file__).resolve().parent.parent / "README.md")
    else:
        print(settings_table())
