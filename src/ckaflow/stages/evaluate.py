"""The `evaluate` stage: linear probes of one run at every layer, and of its untrained network
as the baseline (`ckaflow.evaluate.probe_run`)."""

from __future__ import annotations

from pathlib import Path


def run(
    spec: dict, model: str | Path, data: str | Path, out: str | Path, device: str = "auto"
) -> Path:
    """`spec`: the config's `evaluate` section {layers, steps, weight_decay, untrained}."""
    from ckaflow.evaluate import probe_run

    probe_run(model, data, out, device=device, **spec)
    return Path(out)
