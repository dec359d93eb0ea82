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
    """Within- and cross-model heatmaps, invariance and class structure against depth."""
    input:
        "results/tables/cka.parquet",
    output:
        STUDY.figures(),
    log:
        "results/logs/figures.log",
    conda:
        CONDA_ENV
    shell:
        "ckaflow plot --table {input} --out-dir results/figures > {log} 2>&1"


rule summary:
    """The paper's claims, each a sentence with this run's numbers and a verdict."""
    input:
        "results/tables/cka.parquet",
    output:
        "results/summary.md",
    log:
        "results/logs/summary.log",
    conda:
        CONDA_ENV
    shell:
        "ckaflow summarize --table {input} --out {output} > {log} 2>&1"
