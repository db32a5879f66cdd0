rule vstar:
    """Stage 1: V*(x) = beta1 * log mean exp(r / beta1) per prompt, from all shards."""
    input:
        lambda w: sample_shards(stage("vstar", w).inputs["samples"]),
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
    shell:
        "apo vstar --manifest {params.manifest:q} --stage-dir {params.dir} "
        "--runtime {params.runtime:q} --samples {input} --out {output} 2> {log}"
