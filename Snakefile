# A*-PO: dataset prep -> reference sampling -> V* -> training -> evaluation -> report.
# Every stage writes to results/<stage>/<hash>/, the hash covering exactly the settings it
# reads and the hashes of its inputs (src/apo/settings.py); results/<experiment>/ is the
# readable entry. Run: snakemake --cores all [--configfile config/<other>.yaml]; without
# --configfile the workflow profile (profiles/default) names the demo, config/config.yaml.
from snakemake.utils import min_version

min_version("9.0")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    h=HASH,
    shard=r"\d+",


# Every report output: one that is missing (e.g. new in this version) reruns the report.
rule all:
    input:
        expand(
            f"{EXPERIMENT_DIR}/{{name}}",
            name=[
                "report.md",
                "summary.csv",
                "paper_table.csv",
                "paper_table.tex",
                "training_curves.png",
                "training_phases.png",
                "validation_time.png",
                "validation_steps.png",
                "time_to_accuracy.csv",
            ],
        ),


localrules:
    all,
    report,
    scores,
    pick,


include: "workflow/rules/demo.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/vstar.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
