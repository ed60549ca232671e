"""The documentation's links lead somewhere: every relative link in the READMEs and docs/ names a file that
exists, and every #anchor a heading of that page (GitHub's rule for heading anchors)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([*ROOT.glob("README*.md"), *(ROOT / "docs").glob("*.md")])


def slug(heading: str) -> str:
    text = heading.strip().lstrip("#").strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, fenced = set(), False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"^#{1,6} ", line):
            found.add(slug(line))
    return found


def links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_resolve(page):
    broken = []
    for target in links(page):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, broken


def test_each_english_page_has_its_chinese_twin():
    for page in (ROOT / "docs").glob("*.md"):
        if page.name.endswith(".zh-CN.md") or page.name in ("PERFORMANCE.md", "RESULTS.md"):
            continue
        assert page.with_name(page.stem + ".zh-CN.md").exists(), page.name


def test_the_config_reference_is_generated_from_the_schema():
    """docs/config.md and docs/config.zh-CN.md hold what scripts/config_reference.py writes from the config
    dataclasses (a new field needs its #: comment and its Chinese text in docs/config.zh-CN.yaml)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
