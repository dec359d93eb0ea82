"""The `ckaflow` command line: one subcommand per stage, each a thin call of a library function.

Snakemake rules call these; they work the same by hand. Heavy imports happen inside the
subcommands so that `ckaflow --help` and the CKA stages stay fast.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time

from ckaflow.config import VIEWS, schema_enum

# the CKA estimators, without importing the numeric code (kept in step by tests/test_cli.py)


# a full disk, a read-only or forbidden folder: the user's to fix, so a message, not a traceback
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def storage_message(err: OSError) -> str:
    where = f" writing {err.filename}" if err.filename else ""
    return (
        f"{err.strerror}{where}. Free space or choose a writable results folder, then rerun: "
        "nothing half-written is ever taken as finished, and training and extraction resume "
        "where they stopped."
    )


def _range(text: str) -> range:
    start, _, stop = text.partition(":")
    return range(int(start), int(stop))


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def cmd_prepare(args) -> None:
    from ckaflow import config, data

    spec = json.loads(args.spec)
    if args.root is not None:  # where the files are is no part of the spec (data.root)
        spec["data"]["root"] = args.root
    if "root" not in spec["data"]:
        raise config.ConfigError("ckaflow prepare needs --root (or data.root in --spec)")
    data.prepare(
        config.DataSpec(**spec["data"]),
        config.augment_spec_from_dict(spec["augment"]),
        args.out,
    )


def _launch(args, stage: str, fn, kwargs: dict, key: str):
    """Run a heavy stage here or as a SLURM job, as --backend says."""
    from ckaflow.killpoints import announce
    from ckaflow.launch import SlurmSpec, run_stage

    slurm = SlurmSpec.from_config(json.loads(args.slurm), stage) if args.slurm else None
    announce("stage:start")
    return run_stage(
        stage,
        fn,
        kwargs,
        backend=args.backend,
        key=key,
        slurm=slurm,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )


def cmd_import(args) -> None:
    from ckaflow import config
    from ckaflow.imports import import_run

    run = config.run_spec_from_dict(json.loads(args.spec))
    if run.imported is None:
        raise config.ConfigError("ckaflow import needs the spec of an imported run")
    import_run(run, args.data, args.out, log=lambda line: print(line, file=sys.stderr))


def cmd_train(args) -> None:
    from ckaflow import config
    from ckaflow.train.loop import CheckpointPolicy, train_run

    _set_threads(args.threads)
    spec = json.loads(args.spec)
    kwargs = {
        "run": config.run_spec_from_dict(spec["run"]),
        "aug": config.augment_spec_from_dict(spec["augment"]),
        "data_path": args.data,
        "out_dir": args.out_dir,
        "device": args.device,
        "policy": CheckpointPolicy(**json.loads(args.checkpoint)),
    }
    _launch(args, "train", train_run, kwargs, key=args.out_dir)


def _model_stage(args, stage: str, fn, options: str | None, **kwargs) -> None:
    """A heavy stage that runs a trained model over the data store (evaluate, extract):
    common arguments, plus the optional JSON `options` of its config section."""
    _set_threads(args.threads)
    kwargs.update(model_path=args.model, data_path=args.data, out=args.out, device=args.device)
    kwargs.update(json.loads(options) if options else {})
    _launch(args, stage, fn, kwargs, key=args.out)


def cmd_evaluate(args) -> None:
    from ckaflow.evaluate import probe_run

    _model_stage(args, "evaluate", probe_run, args.spec)


def cmd_run_tables(args) -> None:
    from ckaflow.tables import run_tables

    for path in run_tables(args.runs, args.out_dir):
        print(path)


def cmd_extract(args) -> None:
    from ckaflow.activations import extract

    _model_stage(
        args,
        "extract",
        extract,
        args.store,
        view=args.view,
        batch_size=args.batch_size,
        chunk_rows=args.chunk_rows,
    )


LABEL_GRAM_KEYS = ("estimator", "batch_size", "passes", "seed", "examples")


def cmd_gram(args) -> None:
    from ckaflow.stages.gram import gram_store
    from ckaflow.stages.gram_labels import label_gram_store

    common = {
        "out": args.out,
        "estimator": args.estimator,
        "batch_size": args.batch_size,
        "passes": args.passes,
        "seed": args.seed,
    }
    spec = json.loads(args.spec) if args.spec else {}
    if args.labels:
        common["examples"] = args.examples or None
        common.update({k: v for k, v in spec.items() if k in LABEL_GRAM_KEYS})
        label_gram_store(args.source, **common)
    elif args.source:
        kwargs = {"activations": args.source, "device": args.device, **common}
        _launch(args, "gram", gram_store, kwargs, key=args.out)
    else:
        from ckaflow.errors import ConfigError
        from ckaflow.stages.gram import fused_gram_store

        if not (args.model and args.data and args.view):
            raise ConfigError("ckaflow gram needs --source, or --model, --data and --view")
        _model_stage(
            args,
            "gram",
            fused_gram_store,
            json.dumps(spec),
            view=args.view,
            flush_s=args.flush_s,
            **common,
        )


def cmd_cka(args) -> None:
    from ckaflow.errors import ConfigError
    from ckaflow.stages.cka import Pair, compute_comparisons

    if args.spec:  # the workflow's CkaSpec: every comparison and every setting
        from dataclasses import asdict

        from ckaflow.study import CkaSpec

        try:
            kwargs = asdict(CkaSpec(**json.loads(args.spec)))
            kwargs["pairs"] = [Pair.from_dict(c) for c in kwargs.pop("comparisons")]
        except (ValueError, TypeError, KeyError) as err:  # JSON, keys, a comparison's fields
            raise ConfigError(
                f"--spec is no CKA spec ({err!r}): expected JSON with comparisons (each with id, "
                "kind, a, b), estimator, bootstrap, seed, tile_layers and cache"
            ) from None
    elif args.a and args.b:
        pair = Pair(args.comparison, args.kind, args.a, args.b, args.rows, args.cols)
        kwargs = {"pairs": [pair], "estimator": args.estimator, "bootstrap": args.bootstrap}
        kwargs["seed"] = args.seed
    else:
        raise ConfigError("ckaflow cka needs --spec, or --a and --b")
    _set_threads(args.threads)
    kwargs["out"] = args.out
    _launch(args, "cka", compute_comparisons, kwargs, key=args.out)


def cmd_merge(args) -> None:
    from ckaflow.killpoints import announce
    from ckaflow.tables import merge_cka

    announce("stage:start")
    table = merge_cka(args.tables, args.out, args.config_hash)
    print(f"{args.out}: {len(table)} rows from {len(args.tables)} CKA tables")


def cmd_plot(args) -> None:
    from ckaflow.plots import plot_all

    style = json.loads(args.style) if args.style else None
    for path in plot_all(args.table, args.out_dir, probes=args.probes, style=style):
        print(path)


def cmd_summarize(args) -> None:
    from ckaflow.summary import summarize

    spec = json.loads(args.spec) if args.spec else {}
    print(summarize(args.table, args.out, probes=args.probes, claims_out=args.claims, **spec))


def cmd_plan(args) -> None:
    from ckaflow.plan import plan

    print(plan(args.config, args.gpu_tflops, args.gpus, args.cpu_gflops, args.disk_gbps))


def cmd_inspect(args) -> None:
    from ckaflow.inspect import inspect_path

    print(inspect_path(args.path, args.config))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckaflow", description="Layer-by-layer CKA of SimCLR and supervised networks."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def stage(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    def backend_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--backend",
            default=os.environ.get("CKAFLOW_BACKEND", "local"),
            choices=["local", "slurm"],
            help="where to run (default: $CKAFLOW_BACKEND or local)",
        )
        p.add_argument(
            "--slurm",
            default=os.environ.get("CKAFLOW_SLURM"),
            help="JSON: the config's `slurm` section (default: $CKAFLOW_SLURM)",
        )

    def torch_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--device",
            default=os.environ.get("CKAFLOW_DEVICE", "auto"),
            choices=schema_enum("device"),
            help="default: $CKAFLOW_DEVICE or auto",
        )
        p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
        backend_options(p)

    p = stage("prepare", cmd_prepare, "prepare the data store (subsets and eval views)")
    p.add_argument("--spec", required=True, help="JSON: {data, augment}")
    p.add_argument(
        "--root",
        default=os.environ.get("CKAFLOW_DATA_ROOT"),
        help="folder of the data set's files (default: $CKAFLOW_DATA_ROOT, or data.root in --spec)",
    )
    p.add_argument("--out", required=True)

    p = stage("import", cmd_import, "a checkpoint trained elsewhere as a run's model.pt")
    p.add_argument("--spec", required=True, help="JSON: the imported run (Study.import_spec)")
    p.add_argument("--data", required=True, help="data store (image shape, normalisation)")
    p.add_argument("--out", required=True, help="the run's model.pt")

    p = stage("train", cmd_train, "train one run (resumes from its checkpoint)")
    p.add_argument("--spec", required=True, help="JSON: {run, augment}")
    p.add_argument("--data", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument(
        "--checkpoint",
        default=os.environ.get("CKAFLOW_CHECKPOINT", "{}"),
        help="JSON: {every_min, every_steps} (default: $CKAFLOW_CHECKPOINT or every 10 min)",
    )
    torch_options(p)

    p = stage("evaluate", cmd_evaluate, "linear probes of a run, trained or imported, per layer")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="probes table (parquet)")
    p.add_argument(
        "--spec", default=None, help="JSON: {layers, steps, weight_decay, untrained} (optional)"
    )
    torch_options(p)

    p = stage("run-tables", cmd_run_tables, "training, probes and runs tables of the runs")
    p.add_argument("--out-dir", required=True)
    p.add_argument("runs", nargs="+", help="run folders (model.pt, metrics.parquet, probes)")

    p = stage("extract", cmd_extract, "store the selected activations of one view, to look at")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--view", required=True, choices=VIEWS)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-rows", type=int, default=256)
    p.add_argument(
        "--store",
        default=None,
        help="JSON: {dtype, codec, level, layers, examples, precision, channels_last} (optional)",
    )
    torch_options(p)

    p = stage(
        "gram",
        cmd_gram,
        "Gram statistics of every layer of a run on one view, computed during the forward pass "
        "(--model, --data, --view); or of a stored activation store (--source), or of the labels",
    )
    p.add_argument("--model", default=None, help="model.pt of a trained run (fused stage)")
    p.add_argument("--data", default=None, help="data store (fused stage)")
    p.add_argument("--view", default=None, choices=VIEWS)
    p.add_argument(
        "--spec",
        default=None,
        help="JSON: {estimator, batch_size, passes, seed, examples, layers, precision,"
        " channels_last} (the workflow's; overrides those options)",
    )
    p.add_argument(
        "--flush-s",
        type=float,
        default=60.0,
        help="fused stage: seconds between writes of finished blocks (what a crash can lose)",
    )
    p.add_argument("--source", default=None, help="activation store, or data store (--labels)")
    p.add_argument("--labels", action="store_true", help="use the one-hot eval labels")
    p.add_argument("--examples", type=int, default=0, help="first n examples (0: all; --labels)")
    p.add_argument("--out", required=True)
    p.add_argument("--estimator", default="minibatch", choices=schema_enum("cka.estimator"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--passes",
        type=int,
        default=1,
        help="minibatch: partitions of the examples (pass 0 in stored order, then permuted)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the permutations of passes 1.. (data.seed)"
    )
    torch_options(p)

    p = stage(
        "cka",
        cmd_cka,
        "CKA of every layer pair of a group of comparisons, each Gram store read once",
    )
    p.add_argument(
        "--spec",
        default=None,
        help="JSON: {comparisons: [{id, kind, a, b}], estimator, bootstrap, seed, tile_layers}"
        " (the workflow's; instead of the options below)",
    )
    p.add_argument("--a", default=None, help="one comparison: Gram store of the row side")
    p.add_argument("--b", default=None, help="one comparison: Gram store of the column side")
    p.add_argument("--comparison", default="a-vs-b", help="one comparison: its name")
    p.add_argument("--kind", default="cross", choices=schema_enum("cka.comparisons"))
    p.add_argument("--rows", type=_range, default=None, help="layer index range START:STOP")
    p.add_argument("--cols", type=_range, default=None, help="layer index range START:STOP")
    p.add_argument("--estimator", default="minibatch", choices=schema_enum("cka.estimator"))
    p.add_argument("--bootstrap", type=int, default=0, help="replicates for the CI (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    backend_options(p)

    p = stage("merge", cmd_merge, "merge the CKA jobs' tables into the tidy table")
    p.add_argument("--out", required=True)
    p.add_argument("--config-hash", required=True)
    p.add_argument("tables", nargs="+")

    p = stage("summarize", cmd_summarize, "the paper's claims with this run's numbers")
    p.add_argument("--table", required=True)
    p.add_argument("--probes", default=None, help="probes.parquet (optional)")
    p.add_argument("--claims", default=None, help="write the claims table here (parquet + csv)")
    p.add_argument("--spec", default=None, help='JSON: {"margin": ...} (the config\'s claims)')
    p.add_argument("--out", required=True)

    p = stage("plan", cmd_plan, "jobs, bytes, FLOPs and GPU-hours of a study, before running it")
    p.add_argument("config", nargs="?", default="config.yaml", help="study (default config.yaml)")
    p.add_argument(
        "--gpu-tflops", type=float, default=40.0, help="assumed sustained TFLOP/s of one GPU"
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs the study may use at once")
    p.add_argument(
        "--cpu-gflops",
        type=float,
        default=50.0,
        help="assumed GFLOP/s of the machine that runs Snakemake (and of the CKA job)",
    )
    p.add_argument("--disk-gbps", type=float, default=1.0, help="assumed GB/s of the file system")

    p = stage("inspect", cmd_inspect, "look inside an artifact or a results folder")
    p.add_argument("path", help="a .zarr store, a .pt checkpoint, a table, or results/")
    p.add_argument("--config", default=None, help="with results/: list what this study lacks")

    p = stage("plot", cmd_plot, "figures from the tidy tables")
    p.add_argument("--table", required=True, help="cka.parquet")
    p.add_argument("--probes", default=None, help="probes.parquet (optional)")
    p.add_argument("--style", default=None, help="JSON: the config's plots section {dpi, cmap}")
    p.add_argument("--out-dir", required=True)
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
