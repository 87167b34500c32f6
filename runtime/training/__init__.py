"""Training with the torch backend: members, grown members, coupled ensembles, losses, torch <-> IR,
torchrun."""
