rule prepare_data:
    """Subsets of the real data set and the eval views clean/aug1/aug2, as uint8 images."""
    output:
        directory(STUDY.data_store()),
    params:
        spec=spec({"data": to_jsonable(STUDY.data), "augment": to_jsonable(STUDY.augment)}),
    log:
        STUDY.log("prepare_data", "data"),
    conda:
        CONDA_ENV
    shell:
        "ckaflow prepare --spec {params.spec} --out {output} > {log} 2>&1"
