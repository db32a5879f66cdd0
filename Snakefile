# A*-PO: dataset prep -> reference sampling -> V* -> training -> evaluation -> report.
# Every stage writes to results/<stage>/<hash>/, the hash covering exactly the settings it
# reads and the hashes of its inputs (src/apo/settings.py); results/<experiment>/ is the
# readable entry. Run: snakemake --cores all [--configfile config/<other>.yaml]
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    h=HASH,
    shard=r"\d+",


rule all:
    input:
        f"{EXPERIMENT_DIR}/report.md",
        f"{EXPERIMENT_DIR}/summary.csv",
        f"{EXPERIMENT_DIR}/training_curves.png",


localrules:
    all,
    report,
    scores,


include: "workflow/rules/demo.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/vstar.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
