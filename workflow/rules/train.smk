rule train:
    """Stage 2: A*-PO (or a baseline) on-policy training; reruns resume from the last checkpoint."""
    input:
        prefetched=prefetched,
        model=upstream_model("train"),
        prompts=upstream("train", "prompts", "prompts"),
        vstar=upstream("train", "vstar", "vstar"),
        validation=upstream("train", "validation", "prompts"),
    output:
        **rule_outputs("train"),
    log:
        stage_log("train", "train"),
    benchmark:
        stage_benchmark("train", "train")
    conda:
        "../../envs/apo.yaml"
    # A colocated vLLM engine pins every core it is given (see sample.smk); one training job
    # at a time also keeps the measured training times free of contention.
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
            lock=lambda w: lock_file(stage("train", w).dir, "train"),
            lock_wait_s=config["lock_wait_s"],
        ),
    shell:
        "apo lock --wait-s {params.lock_wait_s} {params.lock:q} -- "
        "accelerate launch {params.launch:q} {params.port} --module apo.cli train "
        f"{STAGE_ARGS} --model {{params.model:q}} {{params.revision:q}} --prompts {{input.prompts:q}} "
        "{params.vstar:q} {params.validation:q} 2>> {log:q}"
