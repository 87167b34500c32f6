"""codec, the Compiler Of Deep Ensembles."""

__version__ = "0.1.0"
