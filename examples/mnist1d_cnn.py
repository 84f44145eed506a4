"""KFC on the MNIST-1D paper's CNN: curvgraph K-FAC against Adam, same initialization and batches.

    python examples/mnist1d_cnn.py --steps 1000
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.demo import batches, load_mnist1d


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 40)), nn.Conv1d(1, 25, 5, stride=2, padding=1), nn.ReLU(),
                         nn.Conv1d(25, 25, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv1d(25, 25, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(125, 10))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()
    data = load_mnist1d()
    order = batches(len(data.x_train), 100, args.steps, seed=0)

    kfac_model = cnn(0)
    opt = curvgraph.compile(kfac_model, (data.x_train[:100],), loss="cross_entropy", backend=args.backend)
    print(opt.plan, end="\n\n")
    for idx in order:
        opt.step(data.x_train[idx], data.y_train[idx])

    adam_model = cnn(0)
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)
    for idx in order:
        adam.zero_grad()
        F.cross_entropy(adam_model(data.x_train[idx]), data.y_train[idx]).backward()
        adam.step()

    print(f"test accuracy after {args.steps} steps: curvgraph K-FAC {accuracy(kfac_model, data.x_test, data.y_test):.3f}, "
          f"Adam 1e-3 {accuracy(adam_model, data.x_test, data.y_test):.3f}")


if __name__ == "__main__":
    main()
