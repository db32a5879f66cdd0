rule demo_model:
    """The embedded demo: synthetic word problems and a tiny warm-started Qwen2 model."""
    output:
        model=directory(f"{RESULTS}/demo_model/{{h}}/model"),
        train=f"{RESULTS}/demo_model/{{h}}/train.jsonl",
        test=f"{RESULTS}/demo_model/{{h}}/test.jsonl",
        valid=f"{RESULTS}/demo_model/{{h}}/valid.jsonl",
    log:
        f"{RESULTS}/demo_model/{{h}}/log/demo_model.log",
    benchmark:
        f"{RESULTS}/demo_model/{{h}}/log/demo_model.benchmark.tsv"
    conda:
        "../../envs/apo.yaml"
    threads: 2
    resources:
        **job_resources("demo_model"),
    params:
        manifest=manifest("demo_model"),
        dir=stage_dir("demo_model"),
        runtime=RUNTIME,
    shell:
        "apo demo --manifest {params.manifest:q} --stage-dir {params.dir:q} "
        "--runtime {params.runtime:q} 2> {log:q}"
