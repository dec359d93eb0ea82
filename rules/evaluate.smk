rule evaluate:
    """Linear probes of one run at every layer, and of its untrained network (the baseline)."""
    input:
        model="results/runs/{run}/model.pt",
        data=STUDY.data_store(),
    output:
        "results/runs/{run}/probes.parquet",
    params:
        spec=spec(config["evaluate"]),
        device=config["device"],
    threads: 2
    log:
        "results/logs/evaluate/{run}.log",
    conda:
        CONDA_ENV
    shell:
        "ckaflow evaluate --model {input.model} --data {input.data} --out {output}"
        " --spec {params.spec} --device {params.device} --threads {threads} > {log} 2>&1"


rule run_tables:
    """Per-epoch training metrics, per-layer probes and one row per run, as tidy tables."""
    input:
        STUDY.run_files(),
    output:
        STUDY.run_tables(),
    params:
        runs=[f"results/runs/{run}" for run in STUDY.runs],
    log:
        "results/logs/run_tables.log",
    conda:
        CONDA_ENV
    shell:
        "ckaflow run-tables --out-dir results/tables {params.runs} > {log} 2>&1"
