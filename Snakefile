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


# The experiment's report: every file `apo report` writes (apo.report.FILES).
rule all:
    input:
        expand(f"{EXPERIMENT_DIR}/{{name}}", name=REPORT_FILES),
        REPORT_PLAN,


onstart:
    extend_train_retries()


localrules:
    all,
    prefetch,
    report,
    evaluate,
    sweep,


include: "workflow/rules/prefetch.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/vstar.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
