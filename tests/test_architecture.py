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
    unnamed = [p.name for p in sorted((ROOT / "src" / "apo").glob("*.py"))
               if p.name != "__init__.py" and f"src/apo/{p.name}" not in text]
    assert not unnamed, f"modules docs/architecture.md does not place: {unnamed}"


# What one stage's module takes from another's: each a reader of the other stage's format
# (docs/architecture.md, "What stages share"), never its internals.
SHARED = {
    ("train", "vstar", "training_data"),
    ("vstar", "data", "load_rows"),
    ("prefetch", "data", "load_rows"),
    ("report", "sweep", "value_text"),
}


def stage_imports(module: str, stages: set[str]) -> set[tuple[str, str, str]]:
    """(module, other stage, name) for every name `module` takes from another stage's module:
    `from apo.<stage> import name`, or `from apo import <stage>` and `<stage>.name`."""
    import ast

    tree = ast.parse((ROOT / "src" / "apo" / f"{module}.py").read_text())
    found, aliases = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("apo."):
            other = node.module.split(".")[1]
            if other in stages and other != module:
                found |= {(module, other, a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "apo":
            aliases |= {a.asname or a.name: a.name for a in node.names if a.name in stages and a.name != module}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname: a.name.split(".")[1] for a in node.names
                        if a.asname and a.name.split(".")[-1] in stages and a.name.split(".")[-1] != module}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            found.add((module, aliases[node.value.id], node.attr))
    return found


def test_stages_share_only_what_the_architecture_page_names():
    """A stage's module (one per rule file) reads another stage's module for the listed
    readers alone; a new one is either moved to a shared module or added to the page."""
    stages = {p.stem for p in (ROOT / "workflow" / "rules").glob("*.smk") if p.stem != "common"}
    found = set().union(*(stage_imports(m, stages) for m in sorted(stages)))
    assert found == SHARED
    text = (ROOT / "docs" / "architecture.md").read_text()
    for importer, other, name in SHARED:
        assert f"`apo.{other}.{name}`" in text and f"`apo.{importer}`" in text, (importer, other, name)
