"""The documentation is self-contained and points at code and files that exist."""

import importlib
import re
from pathlib import Path

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", ROOT / "config" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# What the repository's own text lives in (results/, .venv and .snakemake are not sources).
SOURCES = ("README.md", "Snakefile", "Makefile", "pyproject.toml", "config", "docs", "envs", "profiles",
           "scripts", "src", "tests", "workflow")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".smk", ".sh", ".txt", ".toml", ".rst", ".cfg", ""}

# An absolute path on some machine: a reader of the repository cannot open it.
MACHINE_PATH = re.compile(r"""(?:^|[\s"'`(=:,])/(?:work|home|Users|mnt|scratch|shared|data)/""")


def source_files() -> list[Path]:
    files = []
    for name in SOURCES:
        path = ROOT / name
        candidates = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        files += [p for p in candidates if p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return [p for p in files if p != Path(__file__).resolve()]


def test_no_source_cites_a_file_outside_the_repository():
    files = source_files()
    assert len(files) > 50, files
    bad = []
    for path in files:
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line) or "apo-method" in line:
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "cite the paper, the authors' repository or docs/method.md instead:\n" + "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
    local = [link for link in links if "://" not in link and not link.startswith("mailto:")]
    missing = [link for link in local if not (doc.parent / link).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


def test_method_doc_names_only_code_that_exists():
    text = (ROOT / "docs" / "method.md").read_text()
    names = sorted(set(re.findall(r"`(apo(?:\.\w+)+)`", text)))
    assert len(names) >= 15, names
    missing = []
    for name in names:
        parts = name.split(".")
        # the longest importable module prefix, then attributes
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ModuleNotFoundError:
                continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert not missing, f"docs/method.md names {missing}, which the package does not have"
