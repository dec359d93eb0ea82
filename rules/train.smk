rule train:
    """Train one run (method x arch x seed); resumes from its checkpoint after a crash."""
    input:
        data=STUDY.data_store(),
    output:
        model="results/runs/{run}/model.pt",
        metrics="results/runs/{run}/metrics.parquet",
    params:
        spec=lambda w: spec(
            {"run": to_jsonable(STUDY.runs[w.run]), "augment": to_jsonable(STUDY.augment)}
        ),
        device=config["device"],
    threads: 2
    log:
        "results/logs/train/{run}.log",
    conda:
        CONDA_ENV
    shell:
        "ckaflow train --spec {params.spec} --data {input.data} --out-dir results/runs/{wildcards.run}"
        " --device {params.device} --threads {threads} > {log} 2>&1"
