rule vstar:
    """Stage 1: V*(x) = beta1 * log mean exp(r / beta1) per prompt, from all shards or from
    a published stage-1 table joined to the training prompts."""
    input:
        samples=lambda w: vstar_samples(stage("vstar", w)),
        prompts=vstar_prompts,
        table=upstream("vstar", "table"),
    output:
        f"{RESULTS}/vstar/{{h}}/vstar.parquet",
    log:
        f"{RESULTS}/vstar/{{h}}/log/vstar.log",
    benchmark:
        f"{RESULTS}/vstar/{{h}}/log/vstar.benchmark.tsv"
    conda:
        "../../envs/apo.yaml"
    resources:
        **job_resources("vstar"),
    params:
        manifest=manifest("vstar"),
        dir=stage_dir("vstar"),
        runtime=RUNTIME,
        samples=lambda w, input: ["--samples", *input.samples] if input.samples else [],
    shell:
        "apo vstar --manifest {params.manifest:q} --stage-dir {params.dir:q} "
        "--runtime {params.runtime:q} {params.samples:q} --prompts {input.prompts:q} "
        "--out {output:q} 2> {log:q}"
