rule gram:
    """Per-block Gram statistics of every compared layer of one run on one view, computed during
    the forward pass (no activations on disk): computed once, used by every pair."""
    input:
        model=lambda w: STUDY.model(w.run),
        data=STUDY.data_store(),
    output:
        directory(STUDY.gram(Side("{run}", "{view}"))),
    params:
        estimator=STUDY.cka.estimator,
        batch_size=STUDY.cka.batch_size,
        passes=STUDY.cka.passes,
        seed=config["data"]["seed"],
        spec=lambda w: spec(STUDY.gram_spec(Side(w.run, w.view))),
        device=config["device"],
    threads: 2
    log:
        STUDY.log("gram", "{run}.{view}"),
    conda:
        CONDA_ENV
    shell:
        "ckaflow gram --model {input.model} --data {input.data} --view {wildcards.view}"
        " --out {output} --estimator {params.estimator} --batch-size {params.batch_size}"
        " --passes {params.passes} --seed {params.seed} --spec {params.spec}"
        " --device {params.device} --threads {threads} > {log} 2>&1"


rule gram_labels:
    """The one-hot eval labels as one more representation (class structure)."""
    input:
        STUDY.data_store(),
    output:
        directory(STUDY.gram(Side(LABELS, LABELS))),
    params:
        estimator=STUDY.cka.estimator,
        batch_size=STUDY.cka.batch_size,
        passes=STUDY.cka.passes,
        seed=config["data"]["seed"],
        examples=STUDY.examples or 0,
    log:
        STUDY.log("gram", LABELS),
    conda:
        CONDA_ENV
    shell:
        "ckaflow gram --labels --source {input} --out {output} --estimator {params.estimator}"
        " --batch-size {params.batch_size} --passes {params.passes} --seed {params.seed}"
        " --examples {params.examples} > {log} 2>&1"


rule cka_tile:
    """CKA of one tile of layer pairs of one comparison, from the two sides' Gram stores."""
    input:
        a=lambda w: STUDY.gram(STUDY.comparisons[w.comparison].a),
        b=lambda w: STUDY.gram(STUDY.comparisons[w.comparison].b),
    output:
        STUDY.tile_path(),
    params:
        kind=lambda w: STUDY.comparisons[w.comparison].kind,
        rows=lambda w: tile_range(w, "rows"),
        cols=lambda w: tile_range(w, "cols"),
        estimator=STUDY.cka.estimator,
        bootstrap=STUDY.cka.bootstrap,
        seed=config["data"]["seed"],
    log:
        STUDY.log("cka", "{comparison}.{tile}"),
    conda:
        CONDA_ENV
    shell:
        "ckaflow tile --comparison {wildcards.comparison} --kind {params.kind}"
        " --a {input.a} --b {input.b} --rows {params.rows} --cols {params.cols}"
        " --estimator {params.estimator} --bootstrap {params.bootstrap} --seed {params.seed}"
        " --out {output} > {log} 2>&1"
