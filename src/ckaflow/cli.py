"""The `ckaflow` command line: one subcommand per stage, generated from `ckaflow.stages.STAGES`.

`ckaflow <rule-name> [--spec JSON] --<path> PATH ... --out PATH` runs
`ckaflow.stages.<rule>.run` (the subcommand is the rule's name with '-'): the Snakemake rules call
exactly these (their shell commands come from the same table), and they work the same by hand.
Settings of where and how a stage runs (device, backend, slurm, checkpoint, flush) default to the
CKAFLOW_* environment the workflow sets. Heavy imports happen inside the stages, so that
`ckaflow --help` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time

from ckaflow.config import VIEWS
from ckaflow.stages import CLI_ONLY, STAGES, THREADS, Stage, flag

# a full disk, a read-only or forbidden folder: the user's to fix, so a message, not a traceback
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def storage_message(err: OSError) -> str:
    where = f" writing {err.filename}" if err.filename else ""
    return (
        f"{err.strerror}{where}. Free space or choose a writable results folder, then rerun: "
        "nothing half-written is ever taken as finished, and training and extraction resume "
        "where they stopped."
    )


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _spec(stage: Stage, text: str):
    from ckaflow.errors import ConfigError

    try:
        return stage.spec(json.loads(text))
    except (ValueError, TypeError, KeyError, ConfigError) as err:  # not JSON, not its fields
        raise ConfigError(
            f"--spec is no {stage.command} spec ({err!r}); expected {stage.spec.expected}"
        ) from None


def run_stage_command(stage: Stage, args: argparse.Namespace) -> None:
    """Run one stage as its subcommand's arguments say: here, or as a SLURM job."""
    from ckaflow.killpoints import announce

    kwargs = {"spec": _spec(stage, args.spec)} if stage.spec is not None else {}
    kwargs |= {name: getattr(args, name) for name in stage.paths}
    if stage.view:
        kwargs["view"] = args.view
    own = [s for s in stage.settings if s not in CLI_ONLY]
    # an unset setting (None) leaves run()'s own default
    kwargs |= {s.name: getattr(args, s.name) for s in own if getattr(args, s.name) is not None}
    if THREADS in stage.settings:
        _set_threads(args.threads)
    fn = stage.module().run
    announce("stage:start")
    if not stage.launched:
        result = fn(**kwargs)
    else:
        from ckaflow.launch import SlurmSpec, run_stage

        slurm = SlurmSpec.from_config(args.slurm, stage.rule) if args.slurm else None
        result = run_stage(
            stage.rule,
            fn,
            kwargs,
            backend=args.backend,
            key=str(args.out),
            slurm=slurm,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    # what a stage says for the log: a message (merge, summary) or the files it wrote (tables,
    # figures); a single output path is already in the command line
    if isinstance(result, str):
        print(result)
    elif isinstance(result, list):
        print(*result, sep="\n")


# what each path keyword of the stages is
PATH_HELP = {
    "data": "the data store (results/data/<name>.zarr)",
    "model": "the run's model.pt",
    "runs": "run folders (model.pt, metrics.parquet, probes.parquet)",
    "tables": "the CKA job's tables",
    "cka": "the tidy CKA table (cka.parquet)",
    "probes": "the probes table (probes.parquet)",
    "claims": "the claims table (parquet, and CSV beside it)",
    "out": "the stage's output",
}


def _add_stage(sub, stage: Stage) -> None:
    """The subcommand of one stage, from its line in `STAGES`."""
    p = sub.add_parser(stage.command, help=stage.help, description=stage.help)
    p.set_defaults(func=lambda args: run_stage_command(stage, args))
    if stage.spec is not None:
        p.add_argument("--spec", required=True, help=stage.spec.expected)
    for name in stage.paths:
        p.add_argument(
            flag(name),
            dest=name,
            required=name not in stage.optional,
            nargs="+" if name in stage.many else None,
            help=PATH_HELP[name] + (" (written)" if name in stage.outputs else ""),
        )
    if stage.view:
        p.add_argument("--view", required=True, choices=VIEWS, help="the eval view")
    for setting in stage.settings:
        where = [f"${setting.env}"] if setting.env else []
        default = " or ".join(
            where + ([str(setting.default)] if setting.default is not None else [])
        )
        p.add_argument(
            flag(setting.name),
            dest=setting.name,
            type=setting.parse,
            default=setting.value(),
            choices=setting.choices,
            help=f"{setting.help} (default: {default})" if default else setting.help,
        )


def cmd_plan(args) -> None:
    from ckaflow.plan import plan

    print(plan(args.config, args.gpu_tflops, args.gpus, args.cpu_gflops, args.disk_gbps))


def cmd_inspect(args) -> None:
    from ckaflow.inspect import inspect_path

    print(inspect_path(args.path, args.config))


def _add_tools(sub) -> None:
    """The commands that are no stage: plan a study, look inside an artifact."""
    p = sub.add_parser("plan", help="jobs, bytes, FLOPs and GPU-hours of a study, before running")
    p.set_defaults(func=cmd_plan)
    p.add_argument("config", nargs="?", default="config.yaml", help="study (default config.yaml)")
    p.add_argument("--gpu-tflops", type=float, default=40.0, help="sustained TFLOP/s of one GPU")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the study may use at once")
    p.add_argument(
        "--cpu-gflops",
        type=float,
        default=50.0,
        help="GFLOP/s of the machine that runs Snakemake (and of the CKA job)",
    )
    p.add_argument("--disk-gbps", type=float, default=1.0, help="GB/s of the file system")

    p = sub.add_parser("inspect", help="look inside an artifact or a results folder")
    p.set_defaults(func=cmd_inspect)
    p.add_argument("path", help="a .zarr store, a .pt checkpoint, a table, or results/")
    p.add_argument("--config", default=None, help="with results/: list what this study lacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckaflow",
        description="Layer-by-layer CKA of neural networks: one subcommand per workflow stage "
        "(the Snakemake rule of the same name), plus plan and inspect.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES.values():
        _add_stage(sub, stage)
    _add_tools(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ckaflow.errors import CkaflowError

    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        args.func(args)
    except CkaflowError as err:
        print(f"ckaflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise
        print(f"ckaflow {args.command}: error: {storage_message(err)}", file=sys.stderr)
        return 2
    from ckaflow.bytecount import COUNT

    elapsed = time.perf_counter() - started
    print(f"ckaflow {args.command}: done in {elapsed:.1f}s; {COUNT.report()}", file=sys.stderr)
    return 0
