def report_spec():
    """What the report reads: every evaluation and training run of this experiment."""
    return json.dumps(
        {
            "experiment": PLAN.experiment,
            "evals": [
                {"model": label, "benchmark": bench, "dir": s.dir}
                for (label, bench), s in PLAN.evals.items()
            ],
            "trainings": [{"label": config["train"]["method"], "dir": PLAN.train.dir}],
            "stages": {
                name: s.dir
                for name, s in [
                    ("demo_model", PLAN.demo),
                    ("data_train", PLAN.train_data),
                    *[(f"data_{b}", s) for b, s in PLAN.benchmarks.items()],
                    ("sample", PLAN.sample),
                    ("vstar", PLAN.vstar),
                    ("train", PLAN.train),
                ]
                if s is not None
            },
        }
    )


rule report:
    """Accuracy table (Markdown, CSV), training curves, links to the stages used."""
    input:
        scores=[f"{s.dir}/scores.json" for s in PLAN.evals.values()],
        metrics=[f"{PLAN.train.dir}/metrics.parquet"],
    output:
        md=report(
            f"{EXPERIMENT_DIR}/report.md",
            caption="../report/summary.rst",
            category="Results",
        ),
        csv=f"{EXPERIMENT_DIR}/summary.csv",
        curves=report(
            f"{EXPERIMENT_DIR}/training_curves.png",
            caption="../report/curves.rst",
            category="Training",
        ),
    params:
        spec=report_spec(),
    log:
        f"{EXPERIMENT_DIR}/log/report.log",
    benchmark:
        f"{EXPERIMENT_DIR}/log/report.benchmark.tsv"
    shell:
        "apo report --spec {params.spec:q} --out-dir {EXPERIMENT_DIR} 2> {log}"
