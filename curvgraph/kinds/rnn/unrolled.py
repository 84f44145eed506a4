r"""Unrolled forms of ``nn.RNN``/``nn.LSTM``/``nn.GRU`` and of their cells, on the same Parameters.

``torch.export`` keeps a recurrent module as one opaque ATen op (``aten.lstm``, ...), so
before capture each recurrent module of the model is swapped for the module here that
computes the same function as a Python loop over time steps of ``F.linear`` calls and
gate nonlinearities, and that holds the **same** ``nn.Parameter`` objects under the same
names (so the plan, the step and ``model.named_parameters()`` agree). Export traces the
loop, so every weight becomes ``T`` ``aten.linear`` nodes (one per step), which the
``rnn`` pass groups into one block.

Per layer ``l`` and direction, with ``x_t`` the layer input and ``h_{t-1}`` the state
(PyTorch's gate order and equations):

* RNN: :math:`h_t = \phi(W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh})`, ``phi`` tanh or relu;
* LSTM: :math:`(i, f, g, o) = W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}` (4 chunks),
  :math:`c_t = \sigma(f) c_{t-1} + \sigma(i)\tanh(g)`, :math:`h_t = \sigma(o)\tanh(c_t)`
  (times :math:`W_{hr}` when ``proj_size > 0``);
* GRU: :math:`(r, z, n)` chunks of :math:`W_{ih} x_t + b_{ih}` and :math:`W_{hh} h_{t-1} + b_{hh}`,
  :math:`r = \sigma(\cdot)`, :math:`z = \sigma(\cdot)`, :math:`n = \tanh(i_n + r \odot h_n)`,
  :math:`h_t = (1 - z) n + z h_{t-1}`.

The loop runs over ``x.shape[time]`` in Python, so the captured graph has a **static
sequence length**: the length of the example inputs. A batch of another length is
refused by ``step`` with an error asking to compile with example inputs of that length
(compile once per length). The batch size stays symbolic.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError

#: Gate count per recurrent mode (rows of ``weight_ih`` = gates * hidden).
GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


def _cell(mode: str, x: Tensor, state: Any, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
          w_hr: Tensor | None = None) -> tuple[Tensor, Any]:
    """One time step: ``(output h_t, new state)``; the state is ``h`` or ``(h, c)`` (LSTM)."""
    h = state[0] if mode == "LSTM" else state
    gi = F.linear(x, w_ih, b_ih)
    gh = F.linear(h, w_hh, b_hh)
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = F.linear(h, w_hr)
        return h, (h, c)
    if mode == "GRU":
        ir, iz, i_n = gi.chunk(3, -1)
        hr, hz, h_n = gh.chunk(3, -1)
        r = torch.sigmoid(ir + hr)
        z = torch.sigmoid(iz + hz)
        n = torch.tanh(i_n + r * h_n)
        h = (1 - z) * n + z * h
        return h, h
    h = torch.tanh(gi + gh) if mode == "RNN_TANH" else torch.relu(gi + gh)
    return h, h


class UnrolledRNN(nn.Module):
    """``nn.RNN``/``nn.LSTM``/``nn.GRU`` as an unrolled loop of ``F.linear`` on the module's own Parameters.

    Same call signature and results as the wrapped module (``(output, h_n)`` or
    ``(output, (h_n, c_n))``), for batched and unbatched inputs, ``batch_first`` either
    way, several layers, bidirectional, with or without bias, ``proj_size`` and
    inter-layer dropout (in training mode; the same distribution, not the same mask).
    """

    def __init__(self, module: nn.RNNBase) -> None:
        super().__init__()
        self.mode = module.mode
        self.hidden_size = module.hidden_size
        self.num_layers = module.num_layers
        self.bidirectional = module.bidirectional
        self.batch_first = module.batch_first
        self.dropout = module.dropout
        self.proj_size = getattr(module, "proj_size", 0)
        self.has_bias = module.bias
        self.training = module.training
        for name, param in module.named_parameters(recurse=False):
            self.register_parameter(name, param)

    def _weights(self, layer: int, direction: int) -> tuple[Tensor, ...]:
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        get = lambda n: getattr(self, n + suffix, None)  # noqa: E731
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr")

    def forward(self, input: Tensor, hx: Any = None) -> tuple[Tensor, Any]:  # noqa: A002 -- nn.RNN's name
        if not isinstance(input, Tensor):
            raise ConfigError("curvgraph: recurrent modules with PackedSequence inputs are not supported; pass a padded "
                              "tensor (and mask the padding in the loss).")
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        lstm = self.mode == "LSTM"
        dirs = 2 if self.bidirectional else 1
        out_size = self.proj_size or self.hidden_size
        if hx is None:
            zeros = x.new_zeros(self.num_layers * dirs, x.shape[1], out_size)
            hx = (zeros, x.new_zeros(self.num_layers * dirs, x.shape[1], self.hidden_size)) if lstm else zeros
        elif unbatched:
            hx = tuple(h.unsqueeze(1) for h in hx) if lstm else hx.unsqueeze(1)
        steps = [x[t] for t in range(x.shape[0])]  # time-major (T, N, F): static T
        finals_h, finals_c = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(dirs):
                k = layer * dirs + direction
                w_ih, w_hh, b_ih, b_hh, w_hr = self._weights(layer, direction)
                state = (hx[0][k], hx[1][k]) if lstm else hx[k]
                order = range(len(steps) - 1, -1, -1) if direction else range(len(steps))
                result: list[Tensor] = [None] * len(steps)  # type: ignore[list-item]
                for t in order:
                    result[t], state = _cell(self.mode, steps[t], state, w_ih, w_hh, b_ih, b_hh, w_hr)
                outputs.append(result)
                finals_h.append(state[0] if lstm else state)
                if lstm:
                    finals_c.append(state[1])
            steps = [torch.cat([o[t] for o in outputs], -1) if dirs == 2 else outputs[0][t] for t in range(len(steps))]
            if self.dropout and self.training and layer < self.num_layers - 1:
                steps = [F.dropout(s, self.dropout, True) for s in steps]
        output = torch.stack(steps, 0)
        h_n = torch.stack(finals_h, 0)
        if unbatched:
            output, h_n = output.squeeze(1), h_n.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        if lstm:
            c_n = torch.stack(finals_c, 0)
            return output, (h_n, c_n.squeeze(1) if unbatched else c_n)
        return output, h_n


_CELL_MODES = {nn.LSTMCell: "LSTM", nn.GRUCell: "GRU"}


class UnrolledCell(nn.Module):
    """``nn.RNNCell``/``nn.LSTMCell``/``nn.GRUCell`` as ``F.linear`` + gates on the cell's own Parameters.

    One call is one time step; a cell called at ``T`` steps of a user loop gives ``T``
    ``aten.linear`` nodes per weight, which the ``rnn`` pass makes one block with ``T`` uses.
    """

    def __init__(self, cell: nn.RNNCellBase) -> None:
        super().__init__()
        self.mode = _CELL_MODES.get(type(cell)) or ("RNN_TANH" if cell.nonlinearity == "tanh" else "RNN_RELU")
        self.hidden_size = cell.hidden_size
        for name, param in cell.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.has_bias = cell.bias

    def forward(self, input: Tensor, hx: Any = None) -> Any:  # noqa: A002 -- the cells' name
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            hx = (zeros, zeros) if self.mode == "LSTM" else zeros
        elif unbatched:
            hx = tuple(h.unsqueeze(0) for h in hx) if self.mode == "LSTM" else hx.unsqueeze(0)
        _, state = _cell(self.mode, x, hx, self.weight_ih, self.weight_hh, getattr(self, "bias_ih", None),
                         getattr(self, "bias_hh", None))
        if unbatched:
            state = tuple(s.squeeze(0) for s in state) if self.mode == "LSTM" else state.squeeze(0)
        return state


UNROLLED = (UnrolledRNN, UnrolledCell)


def unrolled_form(module: nn.Module) -> nn.Module | None:
    """The unrolled replacement of a recurrent module or cell (same Parameters), or ``None`` for other modules."""
    if type(module) in (nn.RNN, nn.LSTM, nn.GRU):
        return UnrolledRNN(module)
    if type(module) in (nn.RNNCell, nn.LSTMCell, nn.GRUCell):
        return UnrolledCell(module)
    return None


def unrolled_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose recurrent modules and cells are their unrolled forms, sharing ``model``'s
    Parameters and buffers (e.g. to ``torch.compile`` a first-order step, which dynamo cannot do for ``nn.LSTM``)."""
    import copy

    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, memo=dict(shared))
    for parent in list(twin.modules()):
        for name, child in list(parent._modules.items()):
            replacement = unrolled_form(child) if child is not None else None
            if replacement is not None:
                parent._modules[name] = replacement
    return twin
