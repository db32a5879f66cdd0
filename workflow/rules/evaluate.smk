rule evaluate:
    """One model on one benchmark: pass@1 as avg@k, per-problem samples kept."""
    input:
        model=upstream_model("eval"),
        prompts=upstream("eval", "prompts", "prompts.parquet"),
    output:
        scores=f"{RESULTS}/eval/{{h}}/scores.json",
        samples=f"{RESULTS}/eval/{{h}}/samples.parquet",
    log:
        f"{RESULTS}/eval/{{h}}/log/evaluate.log",
    benchmark:
        f"{RESULTS}/eval/{{h}}/log/evaluate.benchmark.tsv"
    conda:
        "../../envs/apo.yaml"
    threads: 1
    resources:
        **rule_resources("evaluate"),
    params:
        manifest=manifest("eval"),
        dir=stage_dir("eval"),
        runtime=RUNTIME,
        model=upstream_model_path("eval"),
    shell:
        "apo evaluate --manifest {params.manifest:q} --stage-dir {params.dir} "
        "--runtime {params.runtime:q} --model {params.model:q} --prompts {input.prompts} "
        "2> {log}"
