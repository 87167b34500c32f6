"""codec command-line interface (placeholder until the commands land)."""

def main(argv=None):
    return 0
