rule merge_tables:
    """The CKA job's pairs into the tidy table: one row per compared layer pair, checked and
    stamped with the config hash."""
    input:
        STUDY.cka_pairs(),
    output:
        parquet=STUDY.table("cka"),
        csv=STUDY.table("cka", "csv"),
    params:
        spec=spec(STUDY.tables_spec()),
    log:
        STUDY.log("merge_tables", "cka"),
    conda:
        CONDA_ENV
    shell:
        command("merge_tables")


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
        spec=spec(STUDY.figures_spec()),
        out_dir=lambda w, output: os.path.dirname(output[0]),
    log:
        STUDY.log("figures", "figures"),
    conda:
        CONDA_ENV
    shell:
        command("figures")


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
        command("summary")
