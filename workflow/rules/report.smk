rule report:
    """Accuracy table (Markdown, CSV), the paper's method comparison (Markdown, CSV, LaTeX),
    training curves, training time by phase, validation accuracy against training time and
    steps with the time to reach it, links to the stages used."""
    input:
        # known before any pick (the reference, methods without a sweep), then the picks'
        scores=fixed_scores(),
        picks=[output_file(sweep, "pick") for sweep in PLAN.sweeps.values()],
        picked_scores=picked_scores,
        metrics=report_inputs("metrics"),
        validation=report_inputs("validation"),
        sweep=lambda w: [
            output_file(run, "validation")
            for runs in PLAN.grids.values()
            for run in runs.values()
        ],
    output:
        md=report(
            f"{EXPERIMENT_DIR}/report.md",
            caption="../report/summary.rst",
            category="Results",
        ),
        csv=f"{EXPERIMENT_DIR}/summary.csv",
        paper_csv=f"{EXPERIMENT_DIR}/paper_table.csv",
        paper_tex=f"{EXPERIMENT_DIR}/paper_table.tex",
        curves=report(
            f"{EXPERIMENT_DIR}/training_curves.png",
            caption="../report/curves.rst",
            category="Training",
        ),
        phases=report(
            f"{EXPERIMENT_DIR}/training_phases.png",
            caption="../report/phases.rst",
            category="Training",
        ),
        validation_time=report(
            f"{EXPERIMENT_DIR}/validation_time.png",
            caption="../report/validation.rst",
            category="Training",
        ),
        validation_steps=report(
            f"{EXPERIMENT_DIR}/validation_steps.png",
            caption="../report/validation.rst",
            category="Training",
        ),
        time_to_accuracy=f"{EXPERIMENT_DIR}/time_to_accuracy.csv",
        plan=REPORT_PLAN,
    log:
        f"{EXPERIMENT_DIR}/log/report.log",
    benchmark:
        f"{EXPERIMENT_DIR}/log/report.benchmark.tsv"
    conda:
        "../../envs/apo.yaml"
    params:
        spec=report_spec,
        out_dir=lambda w, output: Path(output.md).parent,
        runtime=RUNTIME,
    shell:
        "apo report --spec {params.spec:q} --out-dir {params.out_dir:q} --runtime {params.runtime:q} --plan {output.plan:q} 2>> {log:q}"
