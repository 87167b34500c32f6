"""codec's version, in a module of its own so that the lowest layers can read it without importing codec's
API."""

__version__ = "0.1.0"
