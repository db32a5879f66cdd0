"""The benchmark catalogue: every entry is a valid dataset spec and loads a local file of
the benchmark's schema into the fixed prompt schema with normalised gold answers."""

import json

import pytest
import yaml
from transformers import AutoTokenizer

from apo.config import validate_config
from apo.data import prepare
from conftest import ROOT, SCHEMA

CATALOG = yaml.safe_load((ROOT / "config" / "benchmarks" / "catalog.yaml").read_text())

# (raw gold answer as the dataset stores it, what the pipeline must grade against)
EXAMPLES = {
    "math500": ("\\frac{14}{3}", "\\frac{14}{3}"),
    "minerva_math": ("2.75", "2.75"),
    "olympiadbench": ("$\\sqrt{2}$", "$\\sqrt{2}$"),
    "amc23": (27.0, "27.0"),
    "aime24": ("204", "204"),
    "gsm8k": ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072", "1072"),
}


def test_catalog_covers_the_paper_benchmarks():
    assert set(CATALOG) == set(EXAMPLES)


def test_catalog_entries_validate_as_benchmarks(demo_config):
    demo_config["data"]["benchmarks"] = list(CATALOG.values())
    cfg = validate_config(demo_config, SCHEMA)
    assert [b["name"] for b in cfg["data"]["benchmarks"]] == list(CATALOG)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_entry_loads_a_local_file_of_its_schema(name, tmp_path, tiny_demo):
    spec = {"subset": None, "id_field": None, "answer_format": "plain", "limit": None, **CATALOG[name]}
    raw, expected = EXAMPLES[name]
    row = {spec["prompt_field"]: "What is 1 + 1?", spec["answer_field"]: raw}
    if spec["id_field"]:
        row[spec["id_field"]] = f"{name}/0"
    (tmp_path / f"{spec['split']}.jsonl").write_text(json.dumps(row) + "\n")  # one file per split
    tok = AutoTokenizer.from_pretrained(tiny_demo / "model")
    df, _ = prepare({**spec, "path": str(tmp_path / "{split}.jsonl")},
                    {"instruction": "", "max_prompt_tokens": 256, "template": "chat"}, tok)
    assert df["answer"].tolist() == [expected]
    assert df["question"].tolist() == ["What is 1 + 1?"]
    assert df["id"][0] == (f"{name}/0" if spec["id_field"] else f"{spec['split']}-000000")
