rule extract:
    """Every registered layer of one run on one eval view, into a chunked Zarr store."""
    input:
        model="results/runs/{run}/model.pt",
        data=STUDY.data_store(),
    output:
        directory("results/activations/{run}/{view}.zarr"),
    params:
        store=lambda w: spec(store_options(w.run, w.view)),
        batch_size=config["activations"]["batch_size"],
        chunk_rows=STUDY.cka.batch_size,
        device=config["device"],
    threads: 2
    log:
        "results/logs/extract/{run}.{view}.log",
    conda:
        CONDA_ENV
    shell:
        "ckaflow extract --model {input.model} --data {input.data} --view {wildcards.view}"
        " --out {output} --store {params.store} --batch-size {params.batch_size}"
        " --chunk-rows {params.chunk_rows}"
        " --device {params.device} --threads {threads} > {log} 2>&1"
