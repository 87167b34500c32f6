"""`python -m codec` runs the command-line interface (also as each torchrun worker of `--nproc`)."""

from codec.cli import run

if __name__ == "__main__":
    run()
