"""Evaluation: metrics of members and ensembles (accuracy, NLL, ECE, oracle, redundancy, M)."""
