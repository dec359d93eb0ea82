import json
import os
import shlex


def spec(obj):
    """A JSON argument for the command line, shell-quoted. Used as a param, so that a rule
    reruns when (and only when) the part of the config it depends on changes."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


def tile_range(wildcards, axis):
    """START:STOP of the layers on one axis ("rows" or "cols") of the tile in the wildcards."""
    rows, cols = STUDY.tile_ranges(STUDY.tile(wildcards.comparison, wildcards.tile))
    span = rows if axis == "rows" else cols
    return f"{span.start}:{span.stop}"



# Where heavy stages run, and how often training checkpoints, reach the `ckaflow` commands
# through the environment, not through params: moving a study between the laptop and the
# cluster, or checkpointing more often, must not rerun anything.
os.environ.update(
    CKAFLOW_BACKEND=config["backend"],
    CKAFLOW_SLURM=json.dumps(config["slurm"]),
    CKAFLOW_CHECKPOINT=json.dumps(config["checkpoint"]),
)


# Captions of the report (`snakemake --report`): one per family of figures.
FIGURE_FAMILIES = {
    "within-": ("within.rst", "Within-model CKA"),
    "cross-odd-": ("cross-odd-even.rst", "Cross-model CKA"),
    "cross-even-": ("cross-odd-even.rst", "Cross-model CKA"),
    "cross-diagonal": ("cross-diagonal.rst", "Cross-model CKA"),
    "cross-": ("cross.rst", "Cross-model CKA"),
    "invariance": ("invariance.rst", "Invariance and class structure"),
    "class": ("class.rst", "Invariance and class structure"),
    "probes": ("probes.rst", "Linear probes"),
}


def _family(path):
    name = os.path.basename(path)
    return next(v for prefix, v in FIGURE_FAMILIES.items() if name.startswith(prefix))


def figure_caption(path):
    return f"../workflow/report/{_family(path)[0]}"


def figure_category(path):
    return _family(path)[1]
