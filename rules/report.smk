rule merge_tables:
    """All tiles into one tidy table: one row per compared layer pair."""
    input:
        [STUDY.tile_path(t) for t in STUDY.all_tiles()],
    output:
        parquet="results/tables/cka.parquet",
        csv="results/tables/cka.csv",
    params:
        config_hash=CONFIG_HASH,
    log:
        "results/logs/merge_tables.log",
    conda:
        CONDA_ENV
    shell:
        "ckaflow merge --out {output.parquet} --config-hash {params.config_hash} {input}"
        " > {log} 2>&1"


rule figures:
    """Heatmaps, curves against depth and probe accuracy, as PNG and PDF."""
    input:
        cka="results/tables/cka.parquet",
        probes="results/tables/probes.parquet",
    output:
        [
            report(path, caption=figure_caption(path), category=figure_category(path))
            if path.endswith(".png")
            else path
            for path in STUDY.figures()
        ],
    params:
        style=spec(config["plots"]),
    log:
        "results/logs/figures.log",
    conda:
        CONDA_ENV
    shell:
        "ckaflow plot --table {input.cka} --probes {input.probes} --style {params.style}"
        " --out-dir results/figures > {log} 2>&1"


rule summary:
    """The paper's claims, each a sentence with this run's numbers and a verdict."""
    input:
        cka="results/tables/cka.parquet",
        probes="results/tables/probes.parquet",
    output:
        summary=report(
            "results/summary.md", caption="../workflow/report/summary.rst", category="Summary"
        ),
        claims="results/tables/claims.parquet",
        claims_csv="results/tables/claims.csv",
    log:
        "results/logs/summary.log",
    conda:
        CONDA_ENV
    shell:
        "ckaflow summarize --table {input.cka} --probes {input.probes} --claims {output.claims}"
        " --out {output.summary} > {log} 2>&1"
