rule import_run:
    """A network trained elsewhere (config `imports`) as the run's model.pt: strict loading of
    its checkpoint, which is this rule's input (a changed file reruns it)."""
    input:
        checkpoint=lambda w: STUDY.runs[w.run].imported.checkpoint,
        data=STUDY.data_store(),
    output:
        model=STUDY.model("{run}"),
    wildcard_constraints:
        run=one_of(STUDY.imported_runs()),
    params:
        spec=lambda w: spec(STUDY.import_spec(w.run)),
    log:
        STUDY.log("import_run", "{run}"),
    conda:
        CONDA_ENV
    shell:
        command("import_run")
