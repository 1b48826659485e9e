"""Every relative link in the README and docs points at a file that exists, and every #anchor at one of its headings.

The docs cross-link heavily (results move between files as they are rewritten); a broken link is a silent loss of the
command or figure it pointed at. Anchors follow GitHub's rule: the heading lowercased, characters other than letters,
digits, spaces, hyphens and underscores dropped, spaces made hyphens, repeats numbered -1, -2, ...
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "kernels" / "README.md", ROOT / "cluster" / "README.md"]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_slug_follows_github():
    assert slug("Recall@50–800 on 1M users × 1M items (#7)") == "recall50800-on-1m-users--1m-items-7"
    assert slug("The README's Beauty table, `x_y`") == "the-readmes-beauty-table-x_y"


@pytest.mark.parametrize("doc", [p for p in DOCS if p.is_file()], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)
