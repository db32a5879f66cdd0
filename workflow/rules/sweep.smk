checkpoint sweep:
    """A sweep's pick: the grid run of a method with the best final validation accuracy. A
    checkpoint: the runs on the other seeds and the evaluations follow from what it picks.
    """
    input:
        lambda w: [
            output_file(run, "validation") for run in stage("sweep", w).inputs.values()
        ],
    output:
        **rule_outputs("sweep"),
    log:
        stage_log("sweep", "sweep"),
    benchmark:
        stage_benchmark("sweep", "sweep")
    conda:
        "../../envs/apo.yaml"
    params:
        **stage_params("sweep", runs=lambda w: sweep_runs(stage("sweep", w))),
    shell:
        f"apo sweep {STAGE_ARGS} --runs {{params.runs:q}} 2>> {{log:q}}"
