"""docs/architecture.md stays true: every file it names exists."""

import re

from conftest import ROOT


def test_every_path_the_architecture_page_names_exists():
    text = (ROOT / "docs" / "architecture.md").read_text()
    paths = set(re.findall(r"`((?:src|workflow|tests|docs|config|scripts)/[\w./-]+|Snakefile|README\.md)`", text))
    assert len(paths) > 30  # the page names every stage's rule, module and tests
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_the_architecture_page_covers_every_stage_and_module():
    """A new stage or module is added to the map, or the map says nothing of it."""
    from apo.settings import STAGES

    text = (ROOT / "docs" / "architecture.md").read_text()
    for kind in STAGES:
        assert f"`workflow/rules/{kind}.smk`" in text, kind
    unnamed = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "src" / "apo").rglob("*.py"))
               if p.name != "__init__.py" and f"`{p.relative_to(ROOT)}`" not in text]
    assert not unnamed, f"modules docs/architecture.md does not place: {unnamed}"
