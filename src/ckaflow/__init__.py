"""ckaflow: do two networks learn the same thing, layer by layer? CKA at cluster scale."""

__version__ = "0.1.0"

import warnings

# Snakemake marks a directory output with a `.snakemake_timestamp` file; inside a Zarr store,
# Zarr warns about it on every listing. It is Snakemake's, not damage: say nothing about it.
warnings.filterwarnings(
    "ignore", message=r"Object at \.snakemake_timestamp is not recognized", module="zarr"
)
