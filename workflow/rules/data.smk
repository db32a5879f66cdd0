rule data:
    """Training prompts or one benchmark -> prompts.parquet (id, prompt, question, answer, source)."""
    input:
        prefetched=prefetched,
        tokenizer=upstream_model("data", role="tokenizer"),
        source=upstream("data", "source", "train"),
    output:
        **rule_outputs("data"),
    log:
        stage_log("data", "data"),
    benchmark:
        stage_benchmark("data", "data")
    conda:
        "../../envs/apo.yaml"
    resources:
        **job_resources("data"),
    params:
        **stage_params(
            "data",
            tokenizer=upstream_model_path("data", role="tokenizer"),
            revision=upstream_model_revision("data", role="tokenizer"),
            demo=demo_dir("data"),
        ),
    shell:
        f"apo data {STAGE_ARGS} --tokenizer {{params.tokenizer:q}} {{params.revision:q}} "
        "{params.demo:q} 2>> {log:q}"
