rule vstar:
    """Stage 1: V*(x) = beta1 * log mean exp(r / beta1) per prompt, from all shards or from
    a published stage-1 table joined to the training prompts."""
    input:
        prefetched=prefetched,
        samples=lambda w: vstar_samples(stage("vstar", w)),
        prompts=vstar_prompts,
        table=upstream("vstar", "table"),
    output:
        **rule_outputs("vstar"),
    log:
        stage_log("vstar", "vstar"),
    benchmark:
        stage_benchmark("vstar", "vstar")
    conda:
        "../../envs/apo.yaml"
    resources:
        **job_resources("vstar"),
    params:
        **stage_params(
            "vstar",
            samples=lambda w, input: (
                ["--samples", *input.samples] if input.samples else []
            ),
        ),
    shell:
        f"apo vstar {STAGE_ARGS} {{params.samples:q}} --prompts {{input.prompts:q}} "
        "2>> {log:q}"
