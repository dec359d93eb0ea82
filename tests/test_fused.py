"""The fused Gram stage: statistics during the forward pass equal the store-then-Gram path's."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from ckaflow.cka.grams import block_centre
from ckaflow.cka.pairs import cka_between
from ckaflow.errors import ConfigError, StoreError
from ckaflow.gram_stores import load_stats, open_gram
from ckaflow.stages.gram import _Flusher, fused_gram_store, gram_store
from tests.conftest import BIN, ENV, stage_spec
from tests.tolerances import gram_atol


def _stats(path):
    store = open_gram(path)
    names = [layer["name"] for layer in store.layers]
    return names, load_stats(store, names)


def _fused(trained, prepared, out, **kwargs):
    kwargs = {"estimator": "minibatch", "batch_size": 64, "device": "cpu", **kwargs}
    return fused_gram_store(trained["simclr"], prepared, "clean", out, log=print, **kwargs)


@pytest.fixture(scope="module")
def same_batches(trained, prepared, tmp_path_factory):
    """The SimCLR run's clean view stored with the fused stage's forward batches: 64, 64 and 32
    rows, on the CPU in float32, as `_fused` runs it."""
    from ckaflow.activations import extract

    out = tmp_path_factory.mktemp("same-batches") / "clean.zarr"
    return extract(
        trained["simclr"], prepared, "clean", out, batch_size=64, chunk_rows=64, device="cpu"
    )


@pytest.mark.parametrize(
    "estimator,passes",
    [("minibatch", 1), ("minibatch", 3), ("linear", 1), ("debiased", 1), ("rbf", 1)],
)
def test_fused_equals_store_then_gram(same_batches, trained, prepared, tmp_path, estimator, passes):
    """Real model, real images: the stored path extracted every layer into 64-row chunks; the
    fused stage forwards 64-row blocks (or permuted blocks for passes > 1) and never stores an
    activation. Same statistics, bit for bit, and so the same CKA of every pair.

    Bit for bit because both paths run the same kernels on the same values: the extraction
    forwarded the same batch shapes (a forward pass in other batch shapes may take other float32
    kernels, whose rounding no bound on the Gram stage covers), the permuted blocks of passes > 1
    only put examples at other places of a batch of the same shape, and both form each Gram
    with `grams.block_gram`'s arithmetic (or `grams.gram_stats` for the full-data estimators).
    """
    stored = gram_store(same_batches, tmp_path / "s.zarr", estimator, 64, "cpu", passes, 7)
    fused = _fused(
        trained, prepared, tmp_path / "f.zarr", estimator=estimator, passes=passes, seed=7
    )
    names_s, s = _stats(stored)
    names_f, f = _stats(fused)
    assert names_s == names_f and len(names_f) > 20
    meta_s, meta_f = open_gram(stored).attrs, open_gram(fused).attrs
    for key in ("block_rows", "passes", "partition_seed", "partition_digest", "example_ids"):
        assert meta_s[key] == meta_f[key], key
    for a, b in zip(s, f, strict=True):
        assert b.grams.dtype == np.float64
        np.testing.assert_array_equal(b.grams, a.grams)
    cka_s, cka_f = cka_between(s, s), cka_between(f, f)
    assert np.isfinite(cka_f).all()
    np.testing.assert_array_equal(cka_s, cka_f)
    # float64: a vector against itself through a GEMM and through einsum, length ≤ 9 · 64²
    assert np.abs(np.diag(cka_between(s, f)) - 1).max() <= 1e-10


def test_full_data_layer_groups_change_nothing(trained, prepared, tmp_path):
    """A memory budget too small for two layers makes one forward pass per layer: same bits."""
    one = _fused(trained, prepared, tmp_path / "one.zarr", estimator="linear")
    many = _fused(trained, prepared, tmp_path / "many.zarr", estimator="linear", memory_bytes=1)
    for a, b in zip(_stats(one)[1], _stats(many)[1], strict=True):
        np.testing.assert_array_equal(a.grams, b.grams)


def test_bf16_channels_last_forward_on_the_cpu(trained, prepared, tmp_path):
    """The GPU's forward settings, rehearsed on the CPU: bf16 autocast and channels-last memory.
    The statistics stay float64 and close to float32's, and differ from them (so the settings
    did take effect)."""
    fp32 = _fused(trained, prepared, tmp_path / "fp32.zarr", examples=128)
    bf16 = _fused(
        trained,
        prepared,
        tmp_path / "bf16.zarr",
        examples=128,
        precision="bf16",
        channels_last=True,
    )
    attrs = open_gram(bf16).attrs
    assert attrs["precision"] == "bfloat16" and attrs["channels_last"] is True
    assert open_gram(fp32).attrs["precision"] == "float32"
    a, b = _stats(fp32)[1], _stats(bf16)[1]
    assert all(s.grams.dtype == np.float64 for s in b)
    diag = np.diag(cka_between(a, b))
    assert diag.min() > 0.99, diag
    assert diag.min() < 1 - 1e-6  # bf16 activations are not float32's


def test_gram_products_are_float32_under_bf16_autocast(trained, prepared, tmp_path):
    """The forward runs in bf16, the Gram product must not: the stored Gram of a block equals
    the float32 product of that block's (bf16) activations, centred (`block_centre`), to float32
    precision (the sum of two float32 Gram bounds, `gram_atol`; a bf16 product would be off by
    ~2⁻⁹ relative)."""
    from ckaflow.data import open_prepared
    from ckaflow.models import load_network, record_layers

    layer = "layer3.0.relu1"
    out = _fused(trained, prepared, tmp_path / "g.zarr", precision="bf16", layers=[layer])
    net, _ = load_network(trained["simclr"])
    data = open_prepared(prepared)
    pixels = torch.from_numpy(data.group["views/clean"][:64])
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad(), record_layers(net, [layer]) as seen, bf16:
        net(data.normalise(pixels.float() / 255))
    x = seen[layer]
    assert x.dtype == torch.bfloat16
    bound = 2 * gram_atol(x.float().numpy())
    x = x.float() - block_centre(x.float())  # the stage's centre
    want = (x @ x.T).double().numpy()
    got = _stats(out)[1][0].grams[0]
    assert (np.abs(got - want) <= bound).all(), np.abs(got - want).max()


def test_fused_resumes_after_a_crash(trained, prepared, tmp_path, monkeypatch, capsys):
    """Killed after two flushes (one per block here), the stage resumes after block 2 and ends
    with the statistics of an uninterrupted run."""
    whole = _fused(trained, prepared, tmp_path / "whole.zarr", passes=2, seed=3)
    flush = _Flusher.flush
    calls = {"n": 0}

    def crash_after_two(self, units_done):
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        flush(self, units_done)

    monkeypatch.setattr(_Flusher, "flush", crash_after_two)
    out = tmp_path / "g.zarr"
    with pytest.raises(KeyboardInterrupt):
        _fused(trained, prepared, out, passes=2, seed=3, flush_s=0)
    assert not out.exists() and (tmp_path / ".g.zarr.partial").exists()
    monkeypatch.setattr(_Flusher, "flush", flush)
    capsys.readouterr()
    _fused(trained, prepared, out, passes=2, seed=3, flush_s=0)
    assert "after 2 units" in capsys.readouterr().out
    assert not (tmp_path / ".g.zarr.partial").exists()
    for a, b in zip(_stats(whole)[1], _stats(out)[1], strict=True):
        np.testing.assert_array_equal(a.grams, b.grams)


def test_a_changed_call_does_not_resume(trained, prepared, tmp_path, capsys):
    """A partial store of other settings is rebuilt, never continued."""
    out = tmp_path / "g.zarr"
    _fused(trained, prepared, out, passes=2, seed=3)
    out.rename(tmp_path / ".g.zarr.partial")  # looks like a partial store of seed 3
    capsys.readouterr()
    _fused(trained, prepared, out, passes=2, seed=4)
    assert "resuming" not in capsys.readouterr().out
    assert open_gram(out).attrs["partition_seed"] == 4


def test_non_finite_activations_name_the_layer(trained, prepared, tmp_path):
    state = torch.load(trained["supervised"], weights_only=False)
    key = "encoder.layer2.0.conv1.weight"
    state["model"][key] = torch.full_like(state["model"][key], float("nan"))
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(StoreError, match="layer2.0.relu1: non-finite"):
        fused_gram_store(bad, prepared, "clean", tmp_path / "g.zarr", batch_size=64, device="cpu")
    assert not (tmp_path / "g.zarr").exists()


def test_bad_requests_are_refused(trained, prepared, tmp_path):
    with pytest.raises(StoreError, match="no layers"):
        _fused(trained, prepared, tmp_path / "g.zarr", layers=["layer9.0.out"])
    with pytest.raises(ConfigError, match="minibatch"):
        _fused(trained, prepared, tmp_path / "g.zarr", estimator="linear", passes=2)
    cmd = [str(BIN / "ckaflow"), "gram", "--out", str(tmp_path / "g.zarr"), "--view", "clean"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert result.returncode == 2
    assert "the following arguments are required: --spec, --model, --data" in result.stderr
    assert "Traceback" not in result.stderr
    cmd += ["--spec", stage_spec("gram", estimator="cosine"), "--model", "m.pt", "--data", "d"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "cosine" in result.stderr and "minibatch" in result.stderr, result.stderr


def test_cli_fused_stage(trained, prepared, tmp_path):
    """`ckaflow gram --spec --model --data --view` (the workflow's call) gives the library's
    store."""
    out = tmp_path / "cli.zarr"
    spec = stage_spec("gram", layers=["layer1.0.out", "pool"], examples=100)
    spec = json.loads(spec) | {"batch_size": 32, "passes": 2, "seed": 1}
    cmd = [
        *(str(BIN / "ckaflow"), "gram", "--model", str(trained["simclr"])),
        *("--data", str(prepared), "--view", "aug1", "--out", str(out)),
        *("--spec", json.dumps(spec), "--device", "cpu", "--backend", "local"),
    ]
    subprocess.run(cmd, check=True, env=ENV)
    ref = fused_gram_store(
        trained["simclr"],
        prepared,
        "aug1",
        tmp_path / "ref.zarr",
        batch_size=32,
        passes=2,
        seed=1,
        layers=["layer1.0.out", "pool"],
        examples=100,
        device="cpu",
    )
    names, got = _stats(out)
    assert names == ["layer1.0.out", "pool"]
    assert open_gram(out).attrs["block_rows"] == [32, 32, 32, 4] * 2
    for a, b in zip(_stats(ref)[1], got, strict=True):
        np.testing.assert_array_equal(a.grams, b.grams)
