"""The pipelines: compile, bench, report; each a library call under a thin command in codec.commands."""
