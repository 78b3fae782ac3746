"""`python -m spoold` is the same as the `spoold` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
