rule train:
    """Train one run (method x arch x seed); resumes from its checkpoint after a crash."""
    input:
        data=STUDY.data_store(),
    output:
        model=STUDY.model("{run}"),
        metrics=STUDY.metrics("{run}"),
    wildcard_constraints:
        run=one_of(STUDY.trained_runs()),
    params:
        spec=lambda w: spec(STUDY.train_spec(w.run)),
        out_dir=lambda w: STUDY.run_dir(w.run),
    threads: 2
    log:
        STUDY.log("train", "{run}"),
    conda:
        CONDA_ENV
    shell:
        command("train")
