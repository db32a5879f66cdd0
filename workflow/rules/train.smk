rule train:
    """Stage 2: A*-PO (or a baseline) on-policy training; reruns resume from the last checkpoint."""
    input:
        prefetched=prefetched,
        model=upstream_model("train"),
        prompts=upstream("train", "prompts", "prompts.parquet"),
        vstar=upstream("train", "vstar", "vstar.parquet"),
        validation=upstream("train", "validation", "prompts.parquet"),
    output:
        model=addressed(directory(stage_file("train", "model"))),
        metrics=addressed(stage_file("train", "metrics.parquet")),
        summary=addressed(stage_file("train", "summary.json")),
        validation=addressed(stage_file("train", "validation.parquet")),
    log:
        stage_log("train", "train"),
    benchmark:
        stage_benchmark("train", "train")
    conda:
        "../../envs/apo.yaml"
    # The colocated vLLM engine pins every core it is given (see sample.smk); one training
    # job at a time also keeps the measured training times free of contention.
    threads: workflow.cores
    resources:
        **job_resources("train"),
    params:
        **stage_params(
            "train",
            model=upstream_model_path("train"),
            revision=upstream_model_revision("train"),
            vstar=lambda w, input: ["--vstar", input.vstar] if input.vstar else [],
            validation=lambda w, input: (
                ["--validation", input.validation] if input.validation else []
            ),
            launch=accelerate_args,
            port=accelerate_port,
        ),
    shell:
        "apo lock {params.dir:q}/.train.lock -- "
        "accelerate launch {params.launch:q} {params.port} --module apo.cli train "
        f"{STAGE_ARGS} --model {{params.model:q}} {{params.revision:q}} --prompts {{input.prompts:q}} "
        "{params.vstar:q} {params.validation:q} 2>> {log:q}"
