rule extract:
    """The activations selected for inspection (activations.store) of one run on one view, as a
    chunked Zarr store. CKA never reads it, so changing the selection recomputes nothing else."""
    input:
        model=lambda w: STUDY.model(w.run),
        data=STUDY.data_store(),
    output:
        directory(STUDY.activations("{run}", "{view}")),
    params:
        spec=lambda w: spec(STUDY.extract_spec(Side(w.run, w.view))),
    threads: 2
    log:
        STUDY.log("extract", "{run}.{view}"),
    conda:
        CONDA_ENV
    shell:
        command("extract")
