rule sample_reference:
    """Stage 1: N graded reference samples per training prompt, one shard per job."""
    input:
        model=upstream_model("sample"),
        prompts=upstream("sample", "prompts", "prompts.parquet"),
    output:
        f"{RESULTS}/sample/{{h}}/shard-{{shard}}.parquet",
    log:
        f"{RESULTS}/sample/{{h}}/log/shard-{{shard}}.log",
    benchmark:
        f"{RESULTS}/sample/{{h}}/log/shard-{{shard}}.benchmark.tsv"
    conda:
        "../../envs/apo.yaml"
    # vLLM's CPU engine pins its OpenMP threads to every core it is given and spins on them:
    # two engines sharing cores slow each other down many times over, so a job takes them all.
    threads: workflow.cores
    resources:
        **job_resources("sample"),
    params:
        manifest=manifest("sample"),
        dir=stage_dir("sample"),
        runtime=RUNTIME,
        model=upstream_model_path("sample"),
        revision=upstream_model_revision("sample"),
    shell:
        "apo sample --manifest {params.manifest:q} --stage-dir {params.dir:q} "
        "--runtime {params.runtime:q} --model {params.model:q} {params.revision:q} --prompts {input.prompts:q} "
        "--shard {wildcards.shard} --out {output:q} 2> {log:q}"
