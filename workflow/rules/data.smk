rule prepare_data:
    """Training prompts or one benchmark -> prompts.parquet (id, prompt, question, answer, source)."""
    input:
        tokenizer=upstream_model("data", role="tokenizer"),
        source=upstream("data", "source", "train.jsonl"),
    output:
        f"{RESULTS}/data/{{h}}/prompts.parquet",
    log:
        f"{RESULTS}/data/{{h}}/log/data.log",
    benchmark:
        f"{RESULTS}/data/{{h}}/log/data.benchmark.tsv"
    conda:
        "../../envs/apo.yaml"
    resources:
        **job_resources("data"),
    params:
        manifest=manifest("data"),
        dir=stage_dir("data"),
        runtime=RUNTIME,
        tokenizer=upstream_model_path("data", role="tokenizer"),
        revision=upstream_model_revision("data", role="tokenizer"),
        demo=demo_dir("data"),
    shell:
        "apo data --manifest {params.manifest:q} --stage-dir {params.dir:q} "
        "--runtime {params.runtime:q} --tokenizer {params.tokenizer:q} {params.revision:q} {params.demo:q} "
        "--out {output:q} 2> {log:q}"
