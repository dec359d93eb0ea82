rule extract:
    """The activations selected for inspection (activations.store) of one run on one view, as a
    chunked Zarr store. CKA never reads it, so changing the selection recomputes nothing else."""
    input:
        model=lambda w: STUDY.model(w.run),
        data=STUDY.data_store(),
    output:
        directory(STUDY.activations("{run}", "{view}")),
    params:
        store=lambda w: spec(STUDY.store_spec(Side(w.run, w.view))),
        batch_size=config["activations"]["batch_size"],
        chunk_rows=config["activations"]["chunk_rows"],
        device=config["device"],
    threads: 2
    log:
        STUDY.log("extract", "{run}.{view}"),
    conda:
        CONDA_ENV
    shell:
        "ckaflow extract --model {input.model} --data {input.data} --view {wildcards.view}"
        " --out {output} --store {params.store} --batch-size {params.batch_size}"
        " --chunk-rows {params.chunk_rows}"
        " --device {params.device} --threads {threads} > {log} 2>&1"
