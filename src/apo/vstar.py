"""Stage 1 of A*-PO: the optimal value V*(x) estimated from reference samples.

    V*_hat(x) = beta1 * log( (1/N) * sum_i exp(r_i / beta1) )

(Lee et al. 2025, arXiv 2505.20686, stage 1; docs/method.md, section 2), computed with
logsumexp so large 1/beta1 does not overflow. Limits: beta1 -> 0 gives max_i r_i, beta1 -> inf
the plain mean; beta1 = 0 means "use the mean", as in the authors' code (ZhaolinGao/A-PO,
verl/utils/dataset/rl_dataset.py, lines 140-149).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

log = logging.getLogger(__name__)


def vstar_estimate(rewards: torch.Tensor, beta1: float) -> torch.Tensor:
    """V* per row of `rewards` ([prompts, N]); beta1 == 0 gives the mean over the row."""
    if beta1 < 0:
        raise ValueError(f"vstar.beta1 must be >= 0, got {beta1}")
    rewards = rewards.double()
    if beta1 == 0:
        return rewards.mean(dim=-1)
    n = rewards.shape[-1]
    return beta1 * (torch.logsumexp(rewards / beta1, dim=-1) - math.log(n))


FILTERS = ("keep_all", "drop_unsolved", "drop_unsolved_and_solved")


def filter_prompts(table: pd.DataFrame, how: str) -> pd.DataFrame:
    """Prompt filtering from stage 1 (docs/method.md, section 2): prompts no reference sample
    solved give no learning signal (the paper reports 28% less stage-2 time from dropping
    them); prompts every sample solved give little.

    how: keep_all | drop_unsolved | drop_unsolved_and_solved.
    """
    if how not in FILTERS:
        raise ValueError(f"vstar.filter must be one of {FILTERS}, got {how!r}")
    keep = pd.Series(True, index=table.index)
    if how in ("drop_unsolved", "drop_unsolved_and_solved"):
        keep &= table["n_correct"] > 0
    if how == "drop_unsolved_and_solved":
        keep &= table["n_correct"] < table["n_samples"]
    return table[keep].reset_index(drop=True)


def vstar_table(samples: pd.DataFrame, beta1: float) -> pd.DataFrame:
    """One row per prompt: id, vstar, n_samples, n_correct, mean_reward.

    `samples` has one row per graded reference response (columns id, reward).
    """
    groups = samples.groupby("id", sort=True)["reward"]
    counts = groups.size()
    if counts.nunique() > 1:
        # Rows of unequal N are fine for the estimator, but usually mean a broken shard.
        bad = counts[counts != counts.mode()[0]]
        raise ValueError(f"unequal number of samples per prompt, e.g. {bad.index[0]!r}: {bad.iloc[0]}")
    ids = list(counts.index)
    rewards = torch.tensor([groups.get_group(i).to_list() for i in ids], dtype=torch.float64)
    return pd.DataFrame(
        {
            "id": ids,
            "vstar": vstar_estimate(rewards, beta1).tolist(),
            "n_samples": counts.to_list(),
            "n_correct": (rewards > 0.5).sum(dim=-1).tolist(),
            "mean_reward": rewards.mean(dim=-1).tolist(),
        }
    )


# --------------------------------------------------------------------------- published tables
# vstar.source: table reads the per-prompt rewards of someone else's stage 1 (the authors
# published theirs: one row per prompt, the N rewards in columns eval_0 .. eval_{N-1}, the
# problem text in extra_info.question) instead of sampling the reference model again.


class TableError(ValueError):
    """A stage-1 table that cannot be used; the message names the table, row and column."""


def field_value(row: dict, dotted: str):
    """`row[a][b]...` for a dotted name `a.b...`; an integer part indexes a list."""
    value = row
    for part in dotted.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit():
            value = value[int(part)]
        else:
            raise KeyError(dotted)
    return value


def normalize_text(text: str) -> str:
    """Problem text as a join key: runs of whitespace collapsed, ends stripped."""
    return " ".join(str(text).split())


def _reward(value, where: str) -> float:
    """One reward as a float; None, NaN and non-numbers are errors naming `where`."""
    if isinstance(value, bool):
        return float(value)
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise TableError(f"{where}: reward {value!r} is not a number") from None
    if math.isnan(r):
        raise TableError(f"{where}: reward is missing (NaN)")
    return r


def table_rewards(rows, spec: dict, name: str) -> pd.DataFrame:
    """One row per table row: `key` (join key as a string) and `rewards` (list of floats).

    `rows` iterates over dicts (a `datasets.Dataset` or a list); `spec` is vstar.table.
    """
    key_field = spec["id_field"] or spec["prompt_field"]
    keys, rewards = [], []
    for i, row in enumerate(rows):
        where = f"stage-1 table {name}, row {i}"
        try:
            key = field_value(row, key_field)
        except KeyError:
            raise TableError(f"{where}: no field {key_field!r} (vstar.table); columns: {sorted(row)}") from None
        if key is None or (isinstance(key, str) and not key.strip()):
            raise TableError(f"{where}: join field {key_field!r} is empty")
        keys.append(str(key) if spec["id_field"] else normalize_text(key))
        fields = spec["reward_fields"] or [spec["reward_list_field"]]
        values = []
        for f in fields:
            try:
                v = field_value(row, f)
            except KeyError:
                raise TableError(f"{where}: no reward field {f!r} (vstar.table); columns: {sorted(row)}") from None
            if spec["reward_list_field"]:
                if not isinstance(v, (list, tuple)) or not v:
                    raise TableError(f"{where}, field {f!r}: expected a non-empty list of rewards, got {v!r}")
                values += [_reward(x, f"{where}, field {f!r}[{j}]") for j, x in enumerate(v)]
            else:
                values.append(_reward(v, f"{where}, field {f!r}"))
        rewards.append(values)
    return pd.DataFrame({"key": keys, "rewards": rewards})


def join_table(table: pd.DataFrame, prompts: pd.DataFrame, by_id: bool) -> tuple[pd.DataFrame, dict]:
    """Graded samples in the sample stage's long form (id, reward) for the training prompts
    that the table covers, and the counts of what did not match.

    A key repeated in the table keeps its first row (counted); a training prompt the table
    lacks gets no V*, so A*-PO does not train on it (counted, never silent).
    """
    dup = table["key"].duplicated()
    table = table[~dup]
    keys = prompts["id"].astype(str) if by_id else prompts["question"].map(normalize_text)
    found = keys.isin(set(table["key"]))
    joined = pd.DataFrame({"id": prompts["id"][found], "key": keys[found]}).merge(table, on="key", how="left")
    long = joined[["id", "rewards"]].explode("rewards").rename(columns={"rewards": "reward"})
    long["reward"] = long["reward"].astype(float)
    counts = {
        "table_rows": int(len(table) + dup.sum()),
        "table_duplicate_keys": int(dup.sum()),
        "prompts": int(len(prompts)),
        "prompts_matched": int(found.sum()),
        "prompts_unmatched": int((~found).sum()),
        "table_rows_unused": int((~table["key"].isin(set(keys))).sum()),
    }
    return long.reset_index(drop=True), counts


def samples_from_table(spec: dict, prompts: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Read vstar.table through `datasets.load_dataset` and join it to the training prompts."""
    from apo.data import load_rows

    name = f"{spec['path']!r} split {spec['split']!r}"
    ds = load_rows({"path": spec["path"], "split": spec["split"], "subset": spec.get("subset"),
                    "revision": spec.get("revision")})
    # Only the join and reward columns: the published tables also hold 8 response texts per row.
    fields = [spec["id_field"] or spec["prompt_field"], *(spec["reward_fields"] or [spec["reward_list_field"]])]
    top = sorted({f.split(".")[0] for f in fields})
    missing = [c for c in top if c not in ds.column_names]
    if missing:
        raise TableError(f"stage-1 table {name}: no column(s) {missing} (vstar.table); columns: {ds.column_names}")
    table = table_rewards(ds.select_columns(top), spec, name)
    long, counts = join_table(table, prompts, by_id=spec["id_field"] is not None)
    if counts["prompts_matched"] == 0:
        how = f"id_field {spec['id_field']!r}" if spec["id_field"] else f"prompt_field {spec['prompt_field']!r}"
        raise TableError(
            f"stage-1 table {name}: none of its {counts['table_rows']} rows matches any of the "
            f"{counts['prompts']} training prompts by {how}"
        )
    return long, counts


# --------------------------------------------------------------------------- completeness
# A shard replaced by a valid but partial file, or a V* table that lacks prompts, would make
# A*-PO train on fewer prompts without a word: both are errors, what a filter drops is counted.


class CoverageError(ValueError):
    """Graded samples or V* rows missing for prepared prompts; the message names the files."""


def check_samples(samples: pd.DataFrame, prompts: pd.DataFrame, n: int, shards: int, where: str) -> None:
    """Every prepared prompt has exactly `n` graded samples and no sample is of another prompt.

    `where` is the sample stage directory; a prompt's shard file is named from its position
    (shards are contiguous blocks, `apo.sample.shard_rows`)."""
    per_prompt = samples.groupby("id").size()
    ids = prompts["id"].reset_index(drop=True)
    blocks = np.array_split(np.arange(len(ids)), shards)
    shard_of = {ids[i]: s for s, block in enumerate(blocks) for i in block}
    bad = [(i, int(per_prompt.get(i, 0))) for i in ids if per_prompt.get(i, 0) != n]
    if bad:
        first, got = bad[0]
        raise CoverageError(
            f"{where}/shard-{shard_of[first]}.parquet: prompt {first!r} has {got} graded samples, "
            f"expected sample.n = {n} ({len(bad)} of {len(ids)} prompts differ); the shard file is "
            "partial: delete it and rerun snakemake (rule sample writes it again)"
        )
    extra = sorted(set(per_prompt.index) - set(ids))
    if extra:
        raise CoverageError(
            f"{where}: samples of {len(extra)} ids that are not among the prepared prompts, e.g. "
            f"{extra[:3]}; delete the shard files and rerun snakemake (rule sample)"
        )


def training_data(prompts_path: str, vstar_path: str | None) -> pd.DataFrame:
    """The training prompts with their V* (NaN for the methods that do not read V*).

    Every prepared prompt must have a V* row unless the V* stage counted it out (dropped by
    `vstar.filter`, or not in a published table): anything else is a CoverageError. Reads are
    checked against the checksums their jobs recorded."""
    from apo.job import output_name, read_stage_json, read_stage_parquet

    prompts = read_stage_parquet(prompts_path)
    if vstar_path is None:
        return prompts.assign(vstar=float("nan"))
    table = read_stage_parquet(vstar_path)
    counts_file = Path(vstar_path).with_name(output_name("vstar", "counts"))
    counts = read_stage_json(counts_file)
    left_out = counts["dropped_by_filter"] + counts.get("prompts_unmatched", 0)
    missing = prompts["id"][~prompts["id"].isin(table["id"])]
    unknown = table["id"][~table["id"].isin(prompts["id"])]
    if len(missing) != left_out or len(unknown):
        raise CoverageError(
            f"{vstar_path}: V* for {len(prompts) - len(missing)} of the {len(prompts)} prompts of "
            f"{prompts_path} (and {len(unknown)} unknown ids); its stage counted {left_out} left out "
            f"({counts_file}): the two do not belong together; rerun snakemake (rule vstar)"
        )
    log.info("training on %d of %d prompts: %d dropped by vstar.filter, %d not in the stage-1 table",
             len(prompts) - left_out, len(prompts), counts["dropped_by_filter"], counts.get("prompts_unmatched", 0))
    return prompts.merge(table[["id", "vstar"]], on="id", how="inner")


def run(settings: dict, prompts_path: str, sample_paths: list[str]) -> tuple[pd.DataFrame, dict, dict]:
    """Stage entry: the V* table of the prompts kept by `vstar.filter`, the prompt counts
    (counts.json) and summary metrics. V* comes from the sample stage's shards (checked to
    hold exactly `sample.n` graded samples for every prepared prompt) or, with
    `vstar.source: table`, from a published stage-1 table joined to the prompts."""
    from apo.io import read_json
    from apo.job import read_stage_parquet

    prompts = read_stage_parquet(prompts_path)
    if settings.get("source") == "table":
        samples, counts = samples_from_table(settings["table"], prompts)
        if counts["prompts_unmatched"]:
            log.warning("%d of %d training prompts are not in the stage-1 table %s: no V*, not trained on",
                        counts["prompts_unmatched"], counts["prompts"], settings["table"]["path"])
    else:
        samples = pd.concat([read_stage_parquet(p) for p in sample_paths], ignore_index=True)
        sample_dir = Path(sample_paths[0]).parent
        sampled = read_json(sample_dir / "manifest.json")["settings"]
        check_samples(samples, prompts, sampled["n"], sampled["shards"], str(sample_dir))
        counts = {"prompts": len(prompts)}
    table = vstar_table(samples, settings["beta1"])
    kept = filter_prompts(table, settings["filter"])
    counts.update(prompts_kept=len(kept), dropped_by_filter=len(table) - len(kept))
    log.info("V* for %d prompts; %d kept by filter %s", len(table), len(kept), settings["filter"])
    metrics = {**counts, "vstar_mean": table["vstar"].mean(), "mean_reward": table["mean_reward"].mean(),
               "unsolved": int((table["n_correct"] == 0).sum()),
               "always_solved": int((table["n_correct"] == table["n_samples"]).sum())}
    return kept, counts, metrics
