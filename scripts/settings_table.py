"""Print the README's settings table from shared.settings.Settings (one source of truth).

Usage: python scripts/settings_table.py  (tests/unit/test_docs.py checks the README holds it)
"""

from __future__ import annotations

from shared.settings import Settings


def settings_table() -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for field in Settings.model_fields.values():
        env, _, meaning = (field.description or "").partition(": ")
        default = field.default
        shown = "(empty)" if default in (None, "") else f"`{default}`"
        lines.append(f"| `{env}` | {shown} | {meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_table())
