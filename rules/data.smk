rule prepare_data:
    """Subsets of the real data set and the eval views clean/aug1/aug2, as uint8 images."""
    output:
        directory(STUDY.data_store()),
    params:
        spec=spec(STUDY.prepare_spec()),
    log:
        STUDY.log("prepare_data", "data"),
    conda:
        CONDA_ENV
    shell:
        command("prepare_data")
