"""The built-in demo as a script: K-FAC vs Adam on MNIST-1D (generated locally).

    python examples/mnist1d_demo.py --steps 2000

Same as ``python -m curvgraph demo``; see ``curvgraph/demo.py`` for the code.
"""

import sys

from curvgraph.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
