rule evaluate:
    """A benchmark's pass@1 (avg@k) from its shards (rule `sample`, kind `evaluate`), and the
    per-problem samples in one table."""
    input:
        prompts=upstream("evaluate", "prompts", "prompts"),
        shards=lambda w: shard_files(stage("evaluate", w)),
    output:
        **rule_outputs("evaluate"),
    log:
        stage_log("evaluate", "evaluate"),
    benchmark:
        stage_benchmark("evaluate", "evaluate")
    conda:
        "../../envs/apo.yaml"
    params:
        **stage_params("evaluate"),
    shell:
        f"apo evaluate {STAGE_ARGS} --prompts {{input.prompts:q}} --shards {{input.shards:q}} 2>> {{log:q}}"
