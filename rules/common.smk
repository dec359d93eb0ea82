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



# Where heavy stages run reaches the `ckaflow` commands through the environment, not through
# params: moving a study between the laptop and the cluster must not rerun anything.
os.environ.update(CKAFLOW_BACKEND=config["backend"], CKAFLOW_SLURM=json.dumps(config["slurm"]))


def store_options(run, view):
    """How one activation store is written: precision, codec, the selected layers, examples."""
    act = config["activations"]
    return {
        "dtype": act["dtype"],
        "codec": act["codec"],
        "level": act["level"],
        "layers": [layer.name for layer in STUDY.layers(Side(run, view))],
        "examples": act["examples"],
    }
