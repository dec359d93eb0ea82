"""ckaflow: do two networks learn the same thing, layer by layer? CKA at cluster scale."""

__version__ = "0.1.0"

import warnings

# Snakemake marks a directory output with a `.snakemake_timestamp` file; inside a Zarr store,
# Zarr warns about it on every listing. It is Snakemake's, not damage: say nothing about it.
warnings.filterwarnings(
    "ignore", message=r"Object at \.snakemake_timestamp is not recognized", module="zarr"
)


def compare(models, loader, layers=None, **options):
    """CKA of every layer pair of live networks on a loader's images, as the workflow's tidy
    table: `ckaflow.compare({"a": net_a, "b": net_b}, loader, layers=[...])`. See
    `ckaflow.live.compare` for the options."""
    from ckaflow.live import compare as live_compare

    return live_compare(models, loader, layers, **options)
