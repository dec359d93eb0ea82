"""The `extract` stage: the activations a study selects for inspection, of one run on one view,
as a chunked Zarr store (`ckaflow.activations.extract`). CKA never reads them."""

from __future__ import annotations

from pathlib import Path

from ckaflow.study import ExtractSpec


def run(
    spec: ExtractSpec,
    model: str | Path,
    data: str | Path,
    view: str,
    out: str | Path,
    device: str = "auto",
) -> Path:
    from ckaflow.activations import extract

    return extract(
        model,
        data,
        view,
        out,
        device=device,
        layers=None if spec.layers is None else list(spec.layers),
        examples=spec.examples,
        precision=spec.precision,
        channels_last=spec.channels_last,
        dtype=spec.dtype,
        codec=spec.codec,
        level=spec.level,
        batch_size=spec.batch_size,
        chunk_rows=spec.chunk_rows,
    )
