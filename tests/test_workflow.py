"""The real Snakemake workflow, end to end, on a tiny study of real Fashion-MNIST images."""

import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ckaflow.gram_stores import open_gram
from ckaflow.tables import COLUMNS
from tests.conftest import ENV, REPO, snakemake_cmd

TINY = REPO / "tests" / "configs" / "tiny.yaml"


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = snakemake_cmd(workdir, TINY, *args)
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def finished(tmp_path_factory, fashion_root) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    snakemake(workdir)
    return workdir


@pytest.mark.e2e
def test_table_has_the_documented_schema(finished):
    table = pd.read_parquet(finished / "results" / "tables" / "cka.parquet")
    assert list(table.columns) == [*COLUMNS, "config_hash", "merged_by"]
    assert set(table["kind"]) == {"within", "cross", "invariance", "class"}
    assert set(table["method_a"]) == {"simclr", "supervised"}
    assert set(table["estimator"]) == {"minibatch"}
    assert (table["n"] == 300).all()
    assert (table["bootstrap"] == 20).all()
    assert np.isfinite(table[["ci_low", "ci_high"]]).all().all()
    # every interval holds its estimate (a bootstrap around another value would not)
    assert (table["ci_low"] <= table["value"] + 1e-12).all()
    assert (table["value"] <= table["ci_high"] + 1e-12).all()
    csv = pd.read_csv(finished / "results" / "tables" / "cka.csv")
    assert len(csv) == len(table)


@pytest.mark.e2e
def test_every_layer_with_itself_is_one_and_every_value_finite(finished):
    table = pd.read_parquet(finished / "results" / "tables" / "cka.parquet")
    assert np.isfinite(table["value"]).all()
    diagonal = table[(table["kind"] == "within") & (table["layer_a"] == table["layer_b"])]
    assert len(diagonal) == 3 * (28 + 27)  # every layer of both runs, on each view
    np.testing.assert_allclose(diagonal["value"], 1.0, atol=1e-6)


@pytest.mark.e2e
def test_class_structure_and_invariance_are_compared(finished):
    table = pd.read_parquet(finished / "results" / "tables" / "cka.parquet")
    classes = table[table["kind"] == "class"]
    assert set(classes["layer_b"]) == {"labels"}
    assert len(classes) == 28 + 27
    invariance = table[table["kind"] == "invariance"]
    views = set(zip(invariance["view_a"], invariance["view_b"], strict=True))
    assert views == {("aug1", "aug2"), ("clean", "aug1")}
    per_layer = invariance[invariance["layer_a"] == invariance["layer_b"]]
    assert len(per_layer) == 2 * (28 + 27)


@pytest.mark.e2e
def test_figures_and_artifacts_exist(finished):
    figures = sorted(p.name for p in (finished / "results" / "figures").glob("*.png"))
    assert "class.png" in figures and "invariance.png" in figures and "probes.png" in figures
    assert sum(name.startswith("within-") for name in figures) == 2 * 3  # runs x views
    pdfs = {p.stem for p in (finished / "results" / "figures").glob("*.pdf")}
    assert pdfs == {Path(name).stem for name in figures}
    pair = "simclr-resnet18-w4-s0-vs-supervised-resnet18-w4-s0"
    for part in ("cross", "cross-odd", "cross-even"):
        assert f"{part}-{pair}.png" in figures
    assert "cross-diagonal.png" in figures
    assert all((finished / "results" / "figures" / f).stat().st_size > 10_000 for f in figures)
    # the Gram statistics came from the forward pass; only the selection was stored
    from ckaflow.gram_stores import open_gram
    from ckaflow.store import open_store

    run = "simclr-resnet18-w4-s0"
    gram = open_gram(finished / "results" / "gram" / run / "aug2.zarr")
    assert gram.attrs["source"] == f"results/runs/{run}/model.pt" and len(gram.layers) == 28
    stored = open_store(finished / "results" / "activations" / run / "aug2.zarr")
    kinds = {layer["kind"] for layer in stored.layers}
    assert kinds == {"out", "pool"} and stored.attrs["n_examples"] == 300  # all of tiny's 300
    assert len(stored.layers) == 9  # 8 blocks' out and the pool


@pytest.mark.e2e
def test_summary_states_each_claim_from_the_claims_table(finished):
    from ckaflow.claims import CLAIMS, VERDICTS

    text = (finished / "results" / "summary.md").read_text()
    claims = pd.read_parquet(finished / "results" / "tables" / "claims.parquet")
    assert list(claims["claim"]) == [c.claim for c in CLAIMS]
    assert set(claims["verdict"]) <= set(VERDICTS)
    # one seed per method: no seed pairs, so the claims of sameness cannot be judged
    assert (claims.set_index("claim").loc[["C1", "C2"], "verdict"] == "not measured").all()
    for row in claims.itertuples():
        line = next(line for line in text.splitlines() if line.startswith(f"| **{row.claim}**"))
        assert line.endswith(f"**{row.verdict}** |")
        if row.verdict != "not measured":
            # one run per method: a value, but no interval over runs, so never decided
            assert np.isfinite(row.value) and not np.isfinite(row.ci_low)
            assert row.verdict == "within noise" and "needs ≥ 2 seeds" in row.detail
    assert "linear probe at the pooled features" in text and "untrained" in text


@pytest.mark.e2e
def test_run_tables_training_probes_runs(finished):
    tables = finished / "results" / "tables"
    training = pd.read_parquet(tables / "training.parquet")
    assert set(training["run"]) == {"simclr-resnet18-w4-s0", "supervised-resnet18-w4-s0"}
    assert training["loss"].notna().all() and (training["images_per_s"] > 0).all()
    probes = pd.read_parquet(tables / "probes.parquet")
    assert set(probes["encoder"]) == {"trained", "untrained"}
    per_run = probes.groupby(["run", "encoder"])["layer"].nunique().to_dict()
    assert per_run[("simclr-resnet18-w4-s0", "trained")] == 28
    assert per_run[("supervised-resnet18-w4-s0", "untrained")] == 27
    assert probes["eval_accuracy"].between(0, 1).all()
    runs = pd.read_parquet(tables / "runs.parquet")
    assert len(runs) == 2 and runs["knn_accuracy"].between(0, 1).all()
    assert runs["linear_accuracy"].notna().all() and (runs["train_seconds"] > 0).all()
    assert (runs["recipe_optimizer"] == ["adamw", "sgd"]).all()
    for name in ("training", "probes", "runs"):
        assert len(pd.read_csv(tables / f"{name}.csv")) > 0


@pytest.mark.e2e
def test_report_is_one_html_file_with_every_figure(finished):
    snakemake(finished, "--report", "report.html")
    html = (finished / "report.html").read_text(errors="replace")
    assert len(html) > 100_000
    for caption in ("Within-model CKA of one run", "Linear separability per layer"):
        assert caption in html


@pytest.mark.e2e
def test_second_run_has_nothing_to_do(finished):
    result = snakemake(finished, "--dry-run")
    assert "Nothing to be done" in result.stdout + result.stderr


def planned_jobs(workdir: Path, **changes) -> dict[str, int]:
    """The jobs `snakemake -n` would run after changing the tiny study: rule -> count."""
    import yaml

    cfg = yaml.safe_load(TINY.read_text())
    for key, value in changes.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return dry_run(workdir, cfg)


def dry_run(workdir: Path, cfg: dict, name: str = "changed") -> dict[str, int]:
    """The jobs `snakemake -n` would run for the study `cfg` in `workdir`: rule -> count."""
    import yaml

    changed = workdir / f"{name}.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    cmd = snakemake_cmd(workdir, changed, "--dry-run")
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    if "Nothing to be done" in out:
        return {}
    stats = out.split("Job stats:")[1].split("\n\n")[0].splitlines()[3:]  # after the header
    jobs = dict(line.split() for line in stats if line.strip())
    jobs = {rule: int(count) for rule, count in jobs.items() if rule != "total"}
    jobs.pop("all", None)
    return jobs


def refused(workdir: Path, cfg: dict, key: str) -> None:
    """`snakemake -n` on the study `cfg` stops at the config check, naming `key`."""
    import yaml

    changed = workdir / f"key-{key}.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    cmd = snakemake_cmd(workdir, changed, "--dry-run")
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    said = result.stdout + result.stderr
    assert result.returncode != 0 and key in said and "Job stats" not in said, said[-3000:]
    return None


@pytest.mark.e2e
def test_other_data_files_stop_the_study_and_a_copy_reruns_nothing(finished, tmp_path):
    """data.root pointed at an identical copy of the files: nothing to do; at files that differ
    (one test label changed): Snakemake stops before planning, naming the file and the store,
    rather than keep the old files' results."""
    import gzip
    import shutil

    from ckaflow import config

    study = shutil.copytree(finished, tmp_path / "study", symlinks=True)
    cfg = config.load(TINY)
    copy = shutil.copytree(cfg["data"]["root"], tmp_path / "fashion")
    cfg["data"]["root"] = str(copy)
    assert dry_run(study, cfg) == {}

    labels = copy / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[8] = (raw[8] + 1) % 10  # the first test image's label
    labels.write_bytes(gzip.compress(bytes(raw)))
    changed = study / "changed.yaml"
    changed.write_text(__import__("yaml").safe_dump(cfg))
    result = subprocess.run(
        snakemake_cmd(study, changed, "--dry-run"), capture_output=True, text=True, env=ENV
    )
    said = result.stdout + result.stderr
    assert result.returncode != 0
    assert "(t10k-labels-idx1-ubyte.gz differs by SHA-256)" in said, said[-3000:]
    assert "remove results/data/fashion-mnist.zarr" in said


@pytest.mark.e2e
def test_every_config_key_reruns_what_the_readme_table_says(finished):
    """Each leaf of the schema, changed alone after a complete run: `snakemake -n` plans
    exactly the jobs of its row in tests/rerun_table.py, the table README.md shows."""
    from concurrent.futures import ThreadPoolExecutor

    from ckaflow import config
    from tests import rerun_table

    study = config.load(TINY)
    keys = rerun_table.leaves()
    assert len(keys) > 90 and "cka.bootstrap" in keys and "slurm.gram.time_min" in keys
    unmatched = [key for key in keys if rerun_table.row_for(key) is None]
    assert not unmatched, f"keys with no row in tests/rerun_table.py: {unmatched}"

    def plan(key: str) -> dict[str, int] | None:
        cfg = rerun_table.changed_config(study, key)
        if rerun_table.row_for(key)[1] is rerun_table.REFUSED:
            return refused(finished, cfg, key)
        return dry_run(finished, cfg, f"key-{key}")

    with ThreadPoolExecutor(max_workers=4) as pool:
        got = dict(zip(keys, pool.map(plan, keys), strict=True))
    wrong = {
        key: {"expected": rerun_table.row_for(key)[1], "planned": jobs}
        for key, jobs in got.items()
        if jobs != rerun_table.row_for(key)[1]
    }
    assert not wrong, wrong
    readme = (REPO / "README.md").read_text()
    assert rerun_table.markdown() in readme, "README's rerun table: python -m tests.rerun_table"


@pytest.mark.e2e
def test_adding_a_seed_computes_only_what_involves_it(finished):
    jobs = planned_jobs(finished, seeds=[0, 1])
    new_runs = 2  # simclr and supervised with seed 1
    assert jobs["train"] == new_runs and jobs["evaluate"] == new_runs
    assert jobs["extract"] == jobs["gram"] == new_runs * 3  # three views each
    assert "prepare_data" not in jobs and "gram_labels" not in jobs
    assert jobs["cka"] == 1  # one job for every comparison: what it computes, see the soak test
    assert {"merge_tables", "figures", "summary", "run_tables"} <= set(jobs)


@pytest.mark.e2e
def test_a_cka_setting_reruns_only_cka_stages_and_a_plot_setting_only_figures(finished):
    jobs = planned_jobs(finished, cka={"bootstrap": 30})
    assert set(jobs) == {"cka", "merge_tables", "figures", "summary"}
    # settings that change the Gram statistics: the fused stage onward, never the data store,
    # training, probes or the stored activations
    gram_onward = {"gram", "gram_labels", "cka", "merge_tables", "figures", "summary"}
    for change in ({"batch_size": 32}, {"passes": 2}, {"estimator": "linear"}):
        jobs = planned_jobs(finished, cka=change)
        assert set(jobs) == gram_onward, (change, jobs)
        assert jobs["gram"] == 6  # 2 runs x 3 views
    jobs = planned_jobs(finished, plots={"dpi": 90})
    assert set(jobs) == {"figures"}
    assert planned_jobs(finished, checkpoint={"every_min": 1}) == {}  # execution setting


@pytest.mark.e2e
def test_the_stored_selection_reruns_only_extraction(finished):
    """Adding a layer kind to the stored activations recomputes no Gram statistics; storing
    nothing runs nothing; the forward pass's precision changes both (it changes the values)."""
    more = {"store": {"layers": {"kinds": ["pool", "out", "residual"]}, "examples": 512}}
    assert planned_jobs(finished, activations=more) == {"extract": 6}
    assert planned_jobs(finished, activations={"store": "none"}) == {}
    jobs = planned_jobs(finished, activations={"precision": "bf16"})
    assert {"extract", "gram", "cka"} <= set(jobs) and "train" not in jobs
    assert "gram_labels" not in jobs and "prepare_data" not in jobs


@pytest.mark.e2e
def test_soak_more_seeds_in_one_folder_and_a_concurrent_run_refused(finished):
    """Runs in a row in one results folder (seed 0 done by the fixture, then seed 1, then both
    with two Snakemake processes started at once): the second process must refuse through
    Snakemake's lock; nothing lost, nothing duplicated, nothing recomputed differently."""
    import yaml

    tables = finished / "results" / "tables"
    before = pd.read_parquet(tables / "cka.parquet")
    cfg = yaml.safe_load(TINY.read_text())
    for name, seeds in (("seed1.yaml", [1]), ("both.yaml", [0, 1])):
        (finished / name).write_text(yaml.safe_dump({**cfg, "seeds": seeds}))
    subprocess.run(
        snakemake_cmd(finished, finished / "seed1.yaml"), env=ENV, check=True, capture_output=True
    )
    cmd = snakemake_cmd(finished, finished / "both.yaml")
    procs = [
        subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, outputs
    refused = outputs[[p.returncode for p in procs].index(codes[1])]
    assert "cannot be locked" in refused, refused[-2000:]
    # reruns stay scoped: with seed 0 and seed 1 each computed on their own, the CKA job of both
    # computes only the four cross comparisons between a seed-0 and a seed-1 run, and takes the
    # other 26 (6 per run, 1 cross pair per seed) from its cache, reading no store they alone use
    log = (finished / "results" / "logs" / "cka" / "pairs.log").read_text()
    assert "30 comparisons (4 computed, 26 unchanged)" in log, log
    read = int(re.search(r"read ([\d,]+) bytes", log).group(1).replace(",", ""))
    clean = [open_gram(path) for path in (finished / "results" / "gram").glob("*/clean.zarr")]
    assert len(clean) == 4  # each clean store read once, and nothing else
    assert read == sum(store[layer["name"]].nbytes for store in clean for layer in store.layers)

    runs = sorted(p.name for p in (finished / "results" / "runs").iterdir())
    assert runs == [f"{m}-resnet18-w4-s{s}" for m in ("simclr", "supervised") for s in (0, 1)]
    after = pd.read_parquet(tables / "cka.parquet")
    key = ["comparison", "layer_a", "layer_b"]
    assert not after.duplicated(key).any()
    assert set(after["seed_a"].dropna()) == {0, 1}
    # seed 0's comparisons were not recomputed, or recomputed to the very same values
    merged = before.merge(after, on=key, suffixes=("", "_after"))
    assert len(merged) == len(before)
    assert (merged["value"] == merged["value_after"]).all()
    assert set(pd.read_parquet(tables / "runs.parquet")["run"]) == set(runs)
    assert not list((finished / "results").rglob("*.partial*"))
