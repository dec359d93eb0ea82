rule merge_tables:
    """The CKA job's pairs into the tidy table: one row per compared layer pair, checked and
    stamped with the config hash."""
    input:
        STUDY.cka_pairs(),
    output:
        parquet=STUDY.table("cka"),
        csv=STUDY.table("cka", "csv"),
    params:
        config_hash=STUDY.tables_spec()["config_hash"],
    log:
        STUDY.log("merge_tables", "cka"),
    conda:
        CONDA_ENV
    shell:
        "ckaflow merge --out {output.parquet} --config-hash {params.config_hash} {input}"
        ""
        + LOGGED


rule figures:
    """Heatmaps, curves against depth and probe accuracy, as PNG and PDF."""
    input:
        cka=STUDY.table("cka"),
        probes=STUDY.table("probes"),
    output:
        [
            report(path, caption=figure_caption(path), category=figure_category(path))
            if path.endswith(".png")
            else path
            for path in STUDY.figures()
        ],
    params:
        style=spec(STUDY.figures_spec()),
        out_dir=lambda w, output: os.path.dirname(output[0]),
    log:
        STUDY.log("figures", "figures"),
    conda:
        CONDA_ENV
    shell:
        "ckaflow plot --table {input.cka} --probes {input.probes} --style {params.style}"
        " --out-dir {params.out_dir}"
        + LOGGED


rule summary:
    """The paper's claims, each a sentence with this run's numbers and a verdict."""
    input:
        cka=STUDY.table("cka"),
        probes=STUDY.table("probes"),
    output:
        summary=report(
            STUDY.summary(), caption="../workflow/report/summary.rst", category="Summary"
        ),
        claims=STUDY.table("claims"),
        claims_csv=STUDY.table("claims", "csv"),
    params:
        spec=spec(STUDY.claims_spec()),
    log:
        STUDY.log("summary", "summary"),
    conda:
        CONDA_ENV
    shell:
        "ckaflow summarize --table {input.cka} --probes {input.probes} --claims {output.claims}"
        " --spec {params.spec} --out {output.summary}"
        + LOGGED
