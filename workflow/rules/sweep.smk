checkpoint pick:
    """A sweep's pick: the grid run of a method with the best final validation accuracy. A
    checkpoint: the runs on the other seeds and the evaluations follow from what it picks.
    """
    input:
        lambda w: [
            f"{s.dir}/validation.parquet" for s in stage("pick", w).inputs.values()
        ],
    output:
        f"{RESULTS}/pick/{{h}}/pick.json",
    log:
        f"{RESULTS}/pick/{{h}}/log/pick.log",
    conda:
        "../../envs/apo.yaml"
    params:
        manifest=manifest("pick"),
        dir=stage_dir("pick"),
        runtime=RUNTIME,
        runs=lambda w: pick_runs(stage("pick", w)),
    shell:
        "apo pick --manifest {params.manifest:q} --stage-dir {params.dir} "
        "--runtime {params.runtime:q} --runs {params.runs:q} --out {output} 2> {log}"
