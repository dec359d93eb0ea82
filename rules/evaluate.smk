rule evaluate:
    """Linear probes of one run at every layer, and of its untrained network (the baseline)."""
    input:
        model=STUDY.model("{run}"),
        data=STUDY.data_store(),
    output:
        STUDY.probes("{run}"),
    params:
        spec=spec(STUDY.evaluate_spec()),
    threads: 2
    log:
        STUDY.log("evaluate", "{run}"),
    conda:
        CONDA_ENV
    shell:
        command("evaluate")


rule run_tables:
    """Per-epoch training metrics, per-layer probes and one row per run, as tidy tables."""
    input:
        STUDY.run_files(),
    output:
        STUDY.run_tables(),
    params:
        runs=[STUDY.run_dir(run) for run in STUDY.runs],
        out_dir=lambda w, output: os.path.dirname(output[0]),
    log:
        STUDY.log("run_tables", "runs"),
    conda:
        CONDA_ENV
    shell:
        command("run_tables")
