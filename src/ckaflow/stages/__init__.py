"""The workflow's stages, one module per Snakemake rule: each takes its spec, its input paths
and its output path, and writes its artifact whole or not at all."""
