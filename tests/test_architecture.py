"""docs/architecture.md stays true: every file it names exists; a method is named only by its
registry entry and its loss."""

import ast
import re

from conftest import ROOT

import apo


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
# ------------------------------------------------------------------ a method owns its contract

# The registry and the losses name methods; every other module asks the registry.
REGISTRY = {"methods.py", "losses.py"}
# A string the scan cannot tell from a method's name, and what it names instead.
NOT_A_METHOD = {("tools/bench_peers.py", "dapo"): "TRL's loss_type for the token mean over the batch"}


def _docstrings(tree) -> set[int]:
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return {id(n.body[0].value) for n in nodes
            if n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}


def _word(name: str) -> re.Pattern:
    """`name` as a word of a literal. A*-PO's name is also the package's, which module paths
    (`apo.cli`), file paths (`src/apo/`) and commands (`apo bench-peers`) name: a dot, a slash
    or a space beside it is the package."""
    if name == apo.__name__:
        return re.compile(rf"(?<![\w/-]){re.escape(name)}(?![\w./-]| )")
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")


def method_names_in(source: str, names: set[str], blocks: set[str]) -> set[str]:
    """The method names a module's string literals (docstrings aside: prose) hold: a literal
    that is a name, starts a dotted key of a method's block (`rebel.eta`) or holds a name as a
    word (`train.method ppo ...`, `apo,grpo`)."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docs:
            continue
        text = node.value
        for name in names:
            if text == name or (name in blocks and text.startswith(f"{name}.")) or _word(name).search(text):
                found.add(name)
    return found


def test_no_module_outside_the_registry_and_the_losses_names_a_method():
    from apo.methods import METHODS

    names = set(METHODS)
    blocks = {m.name for m in METHODS.values() if m.name in m.settings}
    src = ROOT / "src" / "apo"
    named = {}
    for path in sorted(src.rglob("*.py")):
        rel = str(path.relative_to(src))
        if rel in REGISTRY:
            continue
        found = {n for n in method_names_in(path.read_text(), names, blocks) if (rel, n) not in NOT_A_METHOD}
        if found:
            named[rel] = sorted(found)
    for path in [ROOT / "Snakefile", *sorted((ROOT / "workflow").rglob("*.smk"))]:
        found = {n for n in names if re.search(rf"""["']{re.escape(n)}["'.]""", path.read_text())}
        if found:
            named[str(path.relative_to(ROOT))] = sorted(found)
    assert not named, f"method names outside apo.methods and apo.losses (ask the registry): {named}"


def test_the_scan_finds_a_method_named_in_each_way():
    names, blocks = {"apo", "rebel", "dr_grpo", "grpo"}, {"rebel", "grpo", "dr_grpo"}
    assert method_names_in('if job.method == "ppo": pass', {"ppo"}, set()) == {"ppo"}
    assert method_names_in('SWEEPABLE = ("lr", "rebel.eta")', names, blocks) == {"rebel"}
    assert method_names_in('m = f"train.method grpo trains {x}"', names, blocks) == {"grpo"}
    assert method_names_in('k = "dr_grpo"', names, blocks) == {"dr_grpo"}
    assert method_names_in('base = cost.loc["apo"]', names, blocks) == {"apo"}
    assert method_names_in('sp.add_argument("--methods", default="apo,rebel")', names, blocks) == {"apo", "rebel"}
    # the package's name in a module path or a command, prose in a docstring: no method
    assert method_names_in('"""GRPO and apo train."""\ncmd = ["-m", "apo.cli"]\nmsg = "apo bench-peers: x"\np = "src/apo/x.py"',
                           names, blocks) == set()


def test_no_stage_imports_the_tools():
    """apo.tools sits beside the pipeline: only the command line reaches into it."""
    importers = []
    for path in sorted((ROOT / "src" / "apo").glob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n == "apo.tools" or n.startswith("apo.tools.") for n in names) or (
                    isinstance(node, ast.ImportFrom) and node.module == "apo" and any(a.name == "tools" for a in node.names)):
                importers.append(path.name)
    assert not importers, f"pipeline modules importing apo.tools: {importers}"
