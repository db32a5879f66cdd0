rule demo:
    """The embedded demo: synthetic word problems and a tiny warm-started Qwen2 model."""
    output:
        **rule_outputs("demo"),
    log:
        stage_log("demo", "demo"),
    benchmark:
        stage_benchmark("demo", "demo")
    conda:
        "../../envs/apo.yaml"
    threads: 2
    resources:
        **job_resources("demo"),
    params:
        **stage_params("demo"),
    shell:
        f"apo demo {STAGE_ARGS} 2>> {{log:q}}"
