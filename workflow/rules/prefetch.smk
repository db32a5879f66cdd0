rule prefetch:
    """Every hub model, dataset and stage-1 table the config names, into the Hugging Face
    cache (apo.prefetch), on the planning host: the jobs after it run offline."""
    output:
        f"{RESULTS}/prefetch/{{h}}/fetched.json",
    log:
        f"{RESULTS}/prefetch/{{h}}/log/prefetch.log",
    conda:
        "../../envs/apo.yaml"
    params:
        artefacts=json.dumps(HUB),
    shell:
        "apo prefetch --artefacts {params.artefacts:q} --out {output:q} 2>> {log:q}"
