rule gram:
    """Per-block Gram statistics of every compared layer of one run on one view, computed during
    the forward pass (no activations on disk): computed once, used by every pair."""
    input:
        model=lambda w: STUDY.model(w.run),
        data=STUDY.data_store(),
    output:
        directory(STUDY.gram(Side("{run}", "{view}"))),
    params:
        spec=lambda w: spec(STUDY.gram_spec(Side(w.run, w.view))),
    threads: 2
    log:
        STUDY.log("gram", "{run}.{view}"),
    conda:
        CONDA_ENV
    shell:
        command("gram")


rule gram_labels:
    """The one-hot eval labels as one more representation (class structure)."""
    input:
        STUDY.data_store(),
    output:
        directory(STUDY.gram(Side(LABELS, LABELS))),
    params:
        spec=spec(STUDY.gram_spec(Side(LABELS, LABELS))),
    log:
        STUDY.log("gram_labels", LABELS),
    conda:
        CONDA_ENV
    shell:
        command("gram_labels")


rule cka:
    """CKA of every layer pair of every comparison, each Gram store read once (a SLURM job with
    the slurm backend). Each comparison's table is kept under its inputs' identity, so a rerun
    computes only the comparisons whose stores or settings changed."""
    input:
        STUDY.gram_stores(),
    output:
        STUDY.cka_pairs(),
    params:
        spec=spec(STUDY.cka_spec()),
    threads: 2
    log:
        STUDY.log("cka", "pairs"),
    conda:
        CONDA_ENV
    shell:
        command("cka")
