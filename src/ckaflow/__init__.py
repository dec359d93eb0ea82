"""ckaflow: do two networks learn the same thing, layer by layer? CKA at cluster scale."""

__version__ = "0.1.0"
