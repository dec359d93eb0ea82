import json
import os
import re
import shlex
from dataclasses import asdict, is_dataclass

from ckaflow.figure_registry import FAMILY
from ckaflow.stages import STAGES


# Every rule's command writes its log (results/logs/<rule>/...), and on failure shows the log's
# last lines in the terminal: the stage's own message, where the user is looking.
LOGGED = (
    " > {log} 2>&1 || {{ status=$?; echo \"ckaflow: a stage failed; the end of {log}:\" >&2;"
    " tail -n 20 {log} | sed 's/^/    /' >&2; exit $status; }}"
)


def one_of(names):
    """A wildcard constraint matching exactly these names (none: nothing)."""
    return "|".join(map(re.escape, names)) or "(?!)"


def command(rule):
    """The rule's shell command: its stage's subcommand (`ckaflow.stages.STAGES`), logged."""
    return STAGES[rule].shell() + LOGGED


def spec(obj):
    """A stage's spec (built by Study) as a shell-quoted JSON argument. It is the rule's one
    param, so the rule reruns when, and only when, something its output depends on changes."""
    value = asdict(obj) if is_dataclass(obj) else obj
    return shlex.quote(json.dumps(value, sort_keys=True))



# Where heavy stages run (backend, slurm, device), how often training checkpoints, and where the
# data set's files lie reach the `ckaflow` commands through the environment, not through params:
# moving a study between the laptop and the cluster, or checkpointing more often, must not rerun
# anything.
os.environ.update(
    CKAFLOW_BACKEND=config["backend"],
    CKAFLOW_DEVICE=config["device"],
    CKAFLOW_DATA_ROOT=config["data"]["root"],
    CKAFLOW_SLURM=json.dumps(config["slurm"]),
    CKAFLOW_CHECKPOINT=json.dumps(config["checkpoint"]),
)
# ... but other files under data.root than the prepared store was made from stop the run
STUDY.check_data_source()


# The report (`snakemake --report`): each figure's caption and category, by its family.
def figure_caption(path):
    return f"../workflow/report/{STUDY.figure_families[path]}.rst"


def figure_category(path):
    return FAMILY[STUDY.figure_families[path]].category
