rule sample:
    """One shard of a sampling stage: graded responses to every prompt of the shard from one
    model. A*-PO's stage 1 (kind `sample`: `sample.n` reference samples per training prompt)
    and a benchmark's evaluation (kind `evaluate`: `evaluate.k` samples per problem) are this
    one operation with different settings."""
    input:
        prefetched=prefetched,
        model=upstream_model(),
        prompts=upstream(None, "prompts", "prompts"),
    output:
        **rule_outputs("sample", kind="{kind}"),
    log:
        stage_log("{kind}", "shard-{shard}"),
    benchmark:
        stage_benchmark("{kind}", "shard-{shard}")
    wildcard_constraints:
        kind="sample|evaluate",
    conda:
        "../../envs/apo.yaml"
    # vLLM's CPU engine pins its OpenMP threads to every core it is given and spins on them:
    # two engines sharing cores slow each other down many times over, so a job takes them all.
    threads: workflow.cores
    resources:
        **job_resources(),
    params:
        **stage_params(model=upstream_model_path(), revision=upstream_model_revision()),
    shell:
        f"apo sample {STAGE_ARGS} --model {{params.model:q}} {{params.revision:q}} "
        "--prompts {input.prompts:q} --shard {wildcards.shard} 2>> {log:q}"
