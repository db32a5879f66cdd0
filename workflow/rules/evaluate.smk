rule evaluate:
    """One model on one shard of one benchmark: k graded samples per problem."""
    input:
        model=upstream_model("eval"),
        prompts=upstream("eval", "prompts", "prompts.parquet"),
    output:
        f"{RESULTS}/eval/{{h}}/shard-{{shard}}.parquet",
    log:
        f"{RESULTS}/eval/{{h}}/log/shard-{{shard}}.log",
    benchmark:
        f"{RESULTS}/eval/{{h}}/log/shard-{{shard}}.benchmark.tsv"
    conda:
        "../../envs/apo.yaml"
    # vLLM's CPU engine pins its OpenMP threads to every core it is given and spins on them:
    # two engines sharing cores slow each other down many times over, so a job takes them all.
    threads: workflow.cores
    resources:
        **job_resources("evaluate"),
    params:
        manifest=manifest("eval"),
        dir=stage_dir("eval"),
        runtime=RUNTIME,
        model=upstream_model_path("eval"),
        revision=upstream_model_revision("eval"),
    shell:
        "apo evaluate --manifest {params.manifest:q} --stage-dir {params.dir:q} "
        "--runtime {params.runtime:q} --model {params.model:q} {params.revision:q} --prompts {input.prompts:q} "
        "--shard {wildcards.shard} --out {output:q} 2> {log:q}"


rule scores:
    """A benchmark's pass@1 (avg@k) from its shards; per-problem samples in one table."""
    input:
        prompts=upstream("eval", "prompts", "prompts.parquet"),
        shards=lambda w: shard_files(stage("eval", w)),
    output:
        scores=f"{RESULTS}/eval/{{h}}/scores.json",
        samples=f"{RESULTS}/eval/{{h}}/samples.parquet",
    log:
        f"{RESULTS}/eval/{{h}}/log/scores.log",
    benchmark:
        f"{RESULTS}/eval/{{h}}/log/scores.benchmark.tsv"
    conda:
        "../../envs/apo.yaml"
    params:
        manifest=manifest("eval"),
        dir=stage_dir("eval"),
        runtime=RUNTIME,
    shell:
        "apo scores --manifest {params.manifest:q} --stage-dir {params.dir:q} "
        "--runtime {params.runtime:q} --prompts {input.prompts:q} --shards {input.shards:q} 2> {log:q}"
