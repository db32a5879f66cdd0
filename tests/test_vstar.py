"""V* = beta1 * log mean exp(r / beta1), its limits and the table built from samples."""

import json
import math

import pandas as pd
import pytest
import torch

from apo.vstar import vstar_estimate, vstar_table


def test_hand_computed_value():
    # rewards (1, 0, 0, 0), beta1 = 0.5: V* = 0.5 * log((e^2 + 3) / 4)
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    expected = 0.5 * math.log((math.exp(2.0) + 3.0) / 4.0)
    assert vstar_estimate(r, 0.5).item() == pytest.approx(expected)
    assert expected == pytest.approx(0.4772, abs=1e-4)  # (7.389 + 3) / 4 = 2.597; log = 0.9545


def test_beta1_zero_means_the_mean():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert vstar_estimate(r, 0.0).tolist() == [0.5, 0.0]


def test_small_beta1_tends_to_max_and_is_stable():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    v = vstar_estimate(r, 1e-4).item()  # exp(1e4) would overflow without logsumexp
    assert math.isfinite(v)
    assert v == pytest.approx(1.0 + 1e-4 * math.log(1 / 8), abs=1e-9)  # -> max as beta1 -> 0


def test_large_beta1_tends_to_mean():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert vstar_estimate(r, 1e6).item() == pytest.approx(0.25, abs=1e-6)


def test_vstar_between_mean_and_max():
    r = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    v = vstar_estimate(r, 0.5)
    assert torch.all(v >= r.mean(-1)) and torch.all(v <= r.max(-1).values)


def test_negative_beta1_rejected():
    with pytest.raises(ValueError, match="beta1"):
        vstar_estimate(torch.zeros(1, 2), -1.0)


def test_table_counts_and_order():
    samples = pd.DataFrame({"id": ["b", "a", "b", "a"], "reward": [1.0, 0.0, 1.0, 1.0]})
    t = vstar_table(samples, 0.0)
    assert t["id"].tolist() == ["a", "b"]
    assert t["n_samples"].tolist() == [2, 2]
    assert t["n_correct"].tolist() == [1, 2]
    assert t["vstar"].tolist() == [0.5, 1.0]


def test_table_rejects_unequal_sample_counts():
    samples = pd.DataFrame({"id": ["a", "a", "b"], "reward": [1.0, 0.0, 1.0]})
    with pytest.raises(ValueError, match="unequal"):
        vstar_table(samples, 0.5)


def test_prompt_filters():
    from apo.vstar import filter_prompts

    samples = pd.DataFrame({"id": list("aabbcc"), "reward": [0.0, 0.0, 1.0, 0.0, 1.0, 1.0]})
    t = vstar_table(samples, 0.5)  # a: unsolved, b: sometimes, c: always solved
    assert filter_prompts(t, "keep_all")["id"].tolist() == ["a", "b", "c"]
    assert filter_prompts(t, "drop_unsolved")["id"].tolist() == ["b", "c"]
    assert filter_prompts(t, "drop_unsolved_and_solved")["id"].tolist() == ["b"]
    with pytest.raises(ValueError, match="vstar.filter"):
        filter_prompts(t, "drop_easy")


# ----------------------------------------------------------------- partial and changed inputs
from apo.job import StageFileError, read_stage_parquet, record_outputs  # noqa: E402
from apo.vstar import CoverageError, check_samples, training_data  # noqa: E402

PREPARED = pd.DataFrame({"id": ["a", "b", "c", "d"]})


def graded(ids_and_counts):
    return pd.DataFrame([{"id": i, "reward": 1.0} for i, n in ids_and_counts for _ in range(n)])


def test_every_prepared_prompt_needs_exactly_n_samples():
    check_samples(graded([("a", 2), ("b", 2), ("c", 2), ("d", 2)]), PREPARED, 2, 2, "results/sample/h")
    # shard 1 (prompts c, d) replaced by a valid file with fewer prompts
    with pytest.raises(CoverageError, match=r"results/sample/h/shard-1.parquet: prompt 'd' has 0 graded samples, "
                                            r"expected sample.n = 2 \(1 of 4 prompts differ\)"):
        check_samples(graded([("a", 2), ("b", 2), ("c", 2)]), PREPARED, 2, 2, "results/sample/h")
    with pytest.raises(CoverageError, match="shard-0.parquet: prompt 'a' has 1 graded samples"):
        check_samples(graded([("a", 1), ("b", 2), ("c", 2), ("d", 2)]), PREPARED, 2, 2, "results/sample/h")
    with pytest.raises(CoverageError, match=r"samples of 1 ids that are not among the prepared prompts, e.g. \['z'\]"):
        check_samples(graded([("a", 2), ("b", 2), ("c", 2), ("d", 2), ("z", 2)]), PREPARED, 2, 2, "d")


def stage_file(tmp_path, kind, name, df, counts=None):
    d = tmp_path / "results" / kind / "0123456789ab"
    d.mkdir(parents=True, exist_ok=True)
    df.to_parquet(d / name)
    files = [d / name]
    if counts is not None:
        (d / "counts.json").write_text(json.dumps(counts))
        files.append(d / "counts.json")
    record_outputs(d, {"kind": kind, "hash": "0123456789ab"}, files)
    return d / name


def test_training_errs_when_vstar_misses_prompts_beyond_those_counted_out(tmp_path):
    prompts = stage_file(tmp_path, "data", "prompts.parquet", PREPARED)
    table = pd.DataFrame({"id": ["a", "b", "c"], "vstar": [0.1, 0.2, 0.3]})
    vstar = stage_file(tmp_path, "vstar", "vstar.parquet", table, {"prompts": 4, "dropped_by_filter": 1})
    assert training_data(str(prompts), str(vstar))["id"].tolist() == ["a", "b", "c"]  # d filtered, counted
    vstar = stage_file(tmp_path, "vstar", "vstar.parquet", table, {"prompts": 4, "dropped_by_filter": 0})
    with pytest.raises(CoverageError, match=r"vstar.parquet: V\* for 3 of the 4 prompts .* counted 0 left out"):
        training_data(str(prompts), str(vstar))
    assert training_data(str(prompts), None)["vstar"].isna().all()  # methods without V*


def test_a_changed_or_truncated_stage_file_names_the_file_and_rule(tmp_path):
    shard = stage_file(tmp_path, "sample", "shard-0.parquet", graded([("a", 2)]))
    assert len(read_stage_parquet(shard)) == 2
    graded([("a", 1)]).to_parquet(shard)  # a valid parquet file, not the one its job wrote
    with pytest.raises(StageFileError, match=rf"{shard}: its content does not match the checksum .*\(rule sample writes it again"):
        read_stage_parquet(shard)
    shard.write_bytes(b"PAR1 truncated")
    record_outputs(shard.parent, {"kind": "sample", "hash": "0123456789ab"}, [shard])  # as its job wrote it
    with pytest.raises(StageFileError, match=rf"{shard}: not a readable parquet file .*\(rule sample writes it again"):
        read_stage_parquet(shard)


def test_a_manifest_without_the_files_checksum_is_an_error_not_a_skipped_check(tmp_path):
    shard = stage_file(tmp_path, "sample", "shard-0.parquet", graded([("a", 2)]))
    manifest = shard.parent / "manifest.json"
    manifest.write_text(json.dumps({"hash": "0123456789ab"}))  # no `outputs` entry
    with pytest.raises(StageFileError, match=rf"{manifest} records no output checksums; delete {shard.parent} "
                                             r"and rerun snakemake \(rule sample"):
        read_stage_parquet(shard)
    manifest.write_text(json.dumps({"hash": "0123456789ab", "outputs": {"shard-1.parquet": "0" * 64}}))
    with pytest.raises(StageFileError, match=rf"{shard}: not among the outputs its job recorded in {manifest}"):
        read_stage_parquet(shard)
    manifest.unlink()
    with pytest.raises(StageFileError, match=rf"{shard}: its stage has no manifest.json \(its job did not finish\)"):
        read_stage_parquet(shard)


def test_shard_jobs_of_one_stage_record_their_checksums_side_by_side(tmp_path):
    d = tmp_path / "results" / "evaluate" / "0123456789ab"
    d.mkdir(parents=True)
    for i in range(2):
        graded([("a", i + 1)]).to_parquet(d / f"shard-{i}.parquet")
        record_outputs(d, {"kind": "evaluate", "hash": "0123456789ab"}, [d / f"shard-{i}.parquet"])
    assert set(json.loads((d / "manifest.json").read_text())["outputs"]) == {"shard-0.parquet", "shard-1.parquet"}
