"""Run the command line as ``python -m dp_grad_callbacks``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
