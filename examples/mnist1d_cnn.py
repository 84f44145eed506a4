"""KFC on the MNIST-1D paper's CNN: curvgraph K-FAC against Adam, same initialization and batches.

    python examples/mnist1d_cnn.py --steps 1000

Same as ``python -m curvgraph demo --model cnn``; see ``curvgraph/demo.py`` for the code.
"""

import sys

from curvgraph.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", "--model", "cnn", "--out", "curvgraph-demo-cnn.png", *sys.argv[1:]]))
