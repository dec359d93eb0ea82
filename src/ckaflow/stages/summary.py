"""The `summary` stage: the paper's claims, each a sentence with this study's numbers and a
verdict, as markdown and as a table (`ckaflow.summary.summarize`)."""

from __future__ import annotations

from pathlib import Path


def run(
    spec: dict,
    cka: str | Path,
    out: str | Path,
    probes: str | Path | None = None,
    claims: str | Path | None = None,
) -> str:
    """`spec`: the config's `claims` section; `claims`: where the claims table goes."""
    from ckaflow.summary import summarize

    return summarize(cka, out, probes=probes, claims_out=claims, **spec)
