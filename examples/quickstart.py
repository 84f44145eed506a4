"""curvgraph in a dozen lines: K-FAC on scikit-learn's digits, with a scheduler and a checkpoint.

    python examples/quickstart.py        (needs scikit-learn)
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

import curvgraph

x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.LayerNorm(128), nn.Linear(128, 10))
opt = curvgraph.compile(model, example_inputs=(x[:64],), loss="cross_entropy", method="kfac")
print(opt.plan)  # two dense blocks and a norm block for LayerNorm's scale and shift

schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300)
for step in range(300):
    idx = torch.randint(0, len(x), (64,))
    loss = opt.step(x[idx], y[idx])  # forward, backward, factors, preconditioning, update: one compiled call
    schedule.step()
    if step % 50 == 0:
        print(f"step {step:3d}  loss {loss.item():.4f}")

with torch.no_grad():
    print(f"train accuracy {(model(x).argmax(1) == y).float().mean().item():.3f}")
torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, "/tmp/curvgraph-quickstart.pt")
