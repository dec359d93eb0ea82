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
        "ckaflow gram --model {input.model} --data {input.data} --view {wildcards.view}"
        " --out {output} --spec {params.spec} --threads {threads}"
        " > {log} 2>&1"


rule gram_labels:
    """The one-hot eval labels as one more representation (class structure)."""
    input:
        STUDY.data_store(),
    output:
        directory(STUDY.gram(Side(LABELS, LABELS))),
    params:
        spec=spec(STUDY.gram_spec(Side(LABELS, LABELS))),
    log:
        STUDY.log("gram", LABELS),
    conda:
        CONDA_ENV
    shell:
        "ckaflow gram --labels --source {input} --out {output} --spec {params.spec} > {log} 2>&1"


rule cka_tile:
    """CKA of one tile of layer pairs of one comparison, from the two sides' Gram stores."""
    input:
        a=lambda w: STUDY.gram(STUDY.comparisons[w.comparison].a),
        b=lambda w: STUDY.gram(STUDY.comparisons[w.comparison].b),
    output:
        STUDY.tile_path(),
    params:
        spec=lambda w: spec(STUDY.tile_spec(STUDY.tile(w.comparison, w.tile))),
    log:
        STUDY.log("cka", "{comparison}.{tile}"),
    conda:
        CONDA_ENV
    shell:
        "ckaflow tile --comparison {wildcards.comparison} --a {input.a} --b {input.b}"
        " --spec {params.spec} --out {output} > {log} 2>&1"
