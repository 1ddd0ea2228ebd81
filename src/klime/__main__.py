"""``python -m klime``: the same command as the ``klime`` script."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
