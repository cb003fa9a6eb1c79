"""``python -m ttrpc.cli``: the ``ttrpc`` command."""

import sys

from ttrpc.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
