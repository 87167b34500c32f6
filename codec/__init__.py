"""codec, the Compiler Of Deep Ensembles."""

from codec.version import __version__

__all__ = ["__version__"]
