"""Embedding and position blocks: a diagonal frequency factor, exact for one token, padding rows untouched;
``nn.EmbeddingBag`` as a lookup and a reduction.

Reference: the exact GGN of the embedding weight by ``torch.func`` (tests/helpers.py),
which for one looked-up token equals ``kron(A, G)`` with the type-2 Fisher.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import curvgraph
from curvgraph.kinds.embedding.bag import bag_form
from helpers import exact_ggn

V, D = 6, 4


class Bag(nn.Module):
    """Embedding -> tanh -> mean over tokens -> linear head."""

    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.head = nn.Linear(D, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens)).mean(1))


def test_plan_has_an_embedding_block_with_a_diagonal_factor():
    opt = curvgraph.compile(Bag(), (torch.randint(0, V, (4, 5)),), backend="eager")
    block = opt.plan.block("emb")
    assert block.kind == "embedding" and opt.plan.fallback_params == ()
    assert block.factors["A"] == curvgraph.Factor((V,), axis=-2, diagonal=True)
    assert block.factors["G"] == curvgraph.Factor((D, D), axis=-1) and block.matrix_shape == (V, D)


@pytest.mark.parametrize("token", [0, 3])
def test_one_token_factors_are_the_exact_ggn(token):
    torch.manual_seed(0)
    model = Bag().double()
    x, y = torch.tensor([[token]]), torch.tensor([1])
    exact = exact_ggn(model, "cross_entropy", x, y, model.emb.weight.detach().flatten(),
                      lambda t: {"emb.weight": t.reshape(V, D)})
    opt = curvgraph.compile(model, (x,), fisher="type2", backend="eager", lr=0.1)
    opt.step(x, y)
    factors = opt.factors()["emb"]
    torch.testing.assert_close(torch.kron(torch.diag(factors["A"]), factors["G"]), exact)


def test_token_frequencies_over_a_batch():
    torch.manual_seed(0)
    model = Bag().double()
    x = torch.randint(0, V, (5, 7))
    opt = curvgraph.compile(model, (x,), fisher="type2", backend="eager", lr=0.1)
    opt.step(x, torch.randint(0, 3, (5,)))
    expected = torch.bincount(x.flatten(), minlength=V).double() / x.numel()
    torch.testing.assert_close(opt.factors()["emb"]["A"], expected)


def test_padding_row_stays_untouched_with_weight_decay():
    torch.manual_seed(0)
    model = Bag(padding_idx=1).double()
    with torch.no_grad():
        model.emb.weight[1] = 0.5  # a nonzero padding row: weight decay would pull it if it were decayed
    before = model.emb.weight.detach().clone()
    x = torch.randint(0, V, (6, 5))
    opt = curvgraph.compile(model, (x,), backend="eager", weight_decay=0.1)
    for _ in range(3):
        opt.step(x, torch.randint(0, 3, (6,)))
    assert torch.equal(model.emb.weight[1], before[1])
    assert not torch.equal(model.emb.weight[0], before[0])


class EmbeddingBagHead(nn.Module):
    """``nn.EmbeddingBag`` over the rows of a ``(N, L)`` index tensor, or flat indices with ``offsets`` -> tanh ->
    linear head."""

    def __init__(self, mode: str = "mean", padding_idx: int | None = None) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(V, D, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(D, 3)

    def forward(self, tokens, offsets=None, per_sample_weights=None):
        return self.head(torch.tanh(self.bag(tokens, offsets, per_sample_weights=per_sample_weights)))


@pytest.mark.parametrize("mode, padding_idx, weighted", [("sum", None, False), ("sum", 2, True), ("mean", None, False),
                                                         ("mean", 2, False), ("max", None, False), ("max", 2, False)])
def test_embedding_bag_form_computes_what_the_module_computes(mode, padding_idx, weighted):
    """Output and weight gradient of the lookup-and-reduction form against ``nn.EmbeddingBag``'s own op, with a bag
    of padding only (its output is 0)."""
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(V, D, mode=mode, padding_idx=padding_idx).double()
    tokens = torch.randint(0, V, (5, 4))
    if padding_idx is not None:
        tokens[0] = padding_idx
        tokens[1, :2] = padding_idx
    weights = torch.rand(5, 4, dtype=torch.float64) if weighted else None
    form = bag_form(bag)
    assert [p for p in form.parameters()] == [bag.weight]
    expected, ours = bag(tokens, per_sample_weights=weights), form(tokens, per_sample_weights=weights)
    torch.testing.assert_close(ours, expected)
    direction = torch.randn_like(expected)
    (grad_expected,) = torch.autograd.grad(expected, bag.weight, direction)
    (grad_ours,) = torch.autograd.grad(ours, bag.weight, direction)
    torch.testing.assert_close(grad_ours, grad_expected)


@pytest.mark.parametrize("mode, padding_idx, weighted", [("sum", None, True), ("sum", 2, False), ("mean", None, False),
                                                         ("mean", 2, False), ("max", None, False), ("max", 2, False)])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_embedding_bag_with_offsets_form_computes_what_the_module_computes(mode, padding_idx, weighted,
                                                                           include_last_offset):
    """The same for flat indices with ``offsets``: bags of 3, 0 (empty), 2 (padding only where there is one), 1 and 5
    entries."""
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(V, D, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset).double()
    tokens = torch.randint(0, V, (11,))
    if padding_idx is not None:
        tokens[3:5] = padding_idx
    offsets = torch.tensor([0, 3, 3, 5, 6] + ([11] if include_last_offset else []))
    weights = torch.rand(11, dtype=torch.float64) if weighted else None
    form = bag_form(bag)
    expected, ours = bag(tokens, offsets, weights), form(tokens, offsets, weights)
    assert expected.shape == (5, D)
    torch.testing.assert_close(ours, expected)
    direction = torch.randn_like(expected)
    (grad_expected,) = torch.autograd.grad(expected, bag.weight, direction)
    (grad_ours,) = torch.autograd.grad(ours, bag.weight, direction)
    torch.testing.assert_close(grad_ours, grad_expected)


@pytest.mark.parametrize("token", [0, 3])
def test_embedding_bag_of_one_token_factors_are_the_exact_ggn(token):
    torch.manual_seed(0)
    model = EmbeddingBagHead().double()
    x, y = torch.tensor([[token]]), torch.tensor([1])
    exact = exact_ggn(model, "cross_entropy", x, y, model.bag.weight.detach().flatten(),
                      lambda t: {"bag.weight": t.reshape(V, D)})
    opt = curvgraph.compile(model, (x,), fisher="type2", backend="eager", lr=0.1)
    assert opt.plan.block("bag").kind == "embedding" and opt.plan.fallback_params == ()
    opt.step(x, y)
    factors = opt.factors()["bag"]
    torch.testing.assert_close(torch.kron(torch.diag(factors["A"]), factors["G"]), exact)


def test_embedding_bag_trains_at_the_defaults():
    """``lr="auto"`` needs curvature products through the model; ``aten.embedding_bag`` has no forward-mode
    derivative, its captured form has."""
    torch.manual_seed(0)
    model = EmbeddingBagHead(padding_idx=0)
    x, y = torch.randint(0, V, (8, 5)), torch.randint(0, 3, (8,))
    opt = curvgraph.compile(model, (x,), backend="eager")
    losses = [opt.step(x, y).item() for _ in range(5)]
    assert opt.skipped_steps == 0 and losses[-1] < 0.5 * losses[0], losses


@pytest.fixture(scope="module")
def flat_and_rows():
    """Copies of one model at the defaults (float64, eager), fed bags of 3 as rows ``(4, 3)``, as flat indices with
    ``offsets``, and as flat indices with ``include_last_offset`` (``offsets`` one longer); four steps each, the same
    batches."""
    torch.manual_seed(0)
    models = {"rows": EmbeddingBagHead(padding_idx=0).double()}
    models["flat"], models["last"] = copy.deepcopy(models["rows"]), copy.deepcopy(models["rows"])
    models["last"].bag.include_last_offset = True
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, V, (4, 3), generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(4)]
    inputs = {"rows": lambda x: (x,), "flat": lambda x: (x.flatten(), torch.arange(0, 12, 3)),
              "last": lambda x: (x.flatten(), torch.arange(0, 13, 3))}
    opts = {k: curvgraph.compile(m, inputs[k](batches[0][0]), backend="eager", seed=0, progress=False)
            for k, m in models.items()}
    losses = {k: [opt.step(inputs[k](x), y).item() for x, y in batches] for k, opt in opts.items()}
    return models, opts, losses


def test_embedding_bag_with_offsets_trains_as_its_rows_form(flat_and_rows):
    """Flat indices with ``offsets`` give the lookup block the same factors and the step the same losses and
    parameters as the rows form, whose factors are checked against the exact GGN above. The batch is read from
    ``offsets`` (its length is the number of bags, or one more): the flat indices have no batch dim."""
    models, opts, losses = flat_and_rows
    assert opts["rows"].skipped_steps == 0 and losses["rows"][-1] < losses["rows"][0]
    assert opts["rows"].plan.block("bag").per_example
    for flat in ("flat", "last"):
        assert opts[flat]._captured.batch_dims == (None, 0)
        assert opts[flat].plan.block("bag").kind == "embedding" and opts[flat].plan.fallback_params == ()
        assert not opts[flat].plan.block("bag").per_example
        torch.testing.assert_close(losses[flat], losses["rows"], rtol=1e-10, atol=0)
        for name, factor in opts["rows"].factors()["bag"].items():
            torch.testing.assert_close(opts[flat].factors()["bag"][name], factor, rtol=1e-10, atol=1e-14)
        for a, b in zip(models[flat].parameters(), models["rows"].parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def uneven_bags(model: nn.Module, method: str):
    """``method`` compiled for bags of 1, 5, 2 and 4 flat indices (12 entries: a ``(4, 3)`` reshape would split them
    wrongly)."""
    tokens, offsets = torch.randint(0, V, (12,)), torch.tensor([0, 1, 6, 8])
    return curvgraph.compile(model, (tokens, offsets), method=method, backend="eager", progress=False), tokens, offsets


def test_ekfac_keeps_kfac_scaling_for_a_bag_with_offsets():
    """EKFAC's correction needs each example's rows; a flat lookup has none, so its block keeps K-FAC's eigenvalue
    scaling (the dense head is corrected) and trains."""
    torch.manual_seed(0)
    opt, tokens, offsets = uneven_bags(EmbeddingBagHead(), "ekfac")
    y = torch.tensor([0, 1, 2, 1])
    losses = [opt.step((tokens, offsets), y).item() for _ in range(6)]
    assert "ekfac_rows_A_head" in opt.source and "ekfac_rows_A_bag" not in opt.source
    assert opt.skipped_steps == 0 and losses[-1] < losses[0], losses


def test_kbfgs_refuses_a_bag_with_offsets_by_name():
    torch.manual_seed(0)
    with pytest.raises(curvgraph.CompileError, match=r"block 'bag' has none: its positions have no batch dim"):
        uneven_bags(EmbeddingBagHead(), "kbfgs")


class TokenProjection(nn.Module):
    """Lookup -> linear layer per token -> tanh -> sum per bag -> head; bags as rows ``(N, L)`` or as flat indices with
    ``offsets`` (summed by the model itself, ``index_add``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.proj = nn.Linear(D, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens, offsets=None):
        h = torch.tanh(self.proj(self.emb(tokens)))
        if offsets is None:
            return self.head(h.sum(1))
        bag = torch.searchsorted(offsets, torch.arange(tokens.shape[0], dtype=offsets.dtype), right=True) - 1
        return self.head(h.new_zeros((offsets.shape[0], h.shape[1])).index_add(0, bag, h))


def test_layers_over_flat_positions_have_the_factors_of_their_rows_form():
    """The lookup and the per-token linear layer over flat positions: the same factors (KFAC-expand) and steps as the
    model over rows ``(4, 3)``. Over flat positions neither block can group its positions by example, so neither
    has example rows, and ``kfac_approx="reduce"`` leaves them at ``expand``."""
    torch.manual_seed(0)
    models = {"rows": TokenProjection().double()}
    models["flat"] = copy.deepcopy(models["rows"])
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, V, (4, 3), generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]
    offsets = torch.arange(0, 12, 3)
    inputs = {"rows": lambda x: (x,), "flat": lambda x: (x.flatten(), offsets)}
    opts = {k: curvgraph.compile(m, inputs[k](batches[0][0]), backend="eager", seed=0, kfac_approx="reduce",
                                 progress=False) for k, m in models.items()}
    plans = {k: {b.name: (b.per_example, b.sharing) for b in opt.plan.blocks} for k, opt in opts.items()}
    assert plans["flat"] == {"emb": (False, None), "proj": (False, "expand"), "head": (True, "reduce")}
    assert plans["rows"]["proj"] == (True, "reduce")
    # the steps compared at expand, the sharing the flat blocks keep (the head has one position: the same either way)
    opts["rows"] = curvgraph.compile(models["rows"], (batches[0][0],), backend="eager", seed=0, progress=False)
    losses = {k: [opt.step(inputs[k](x), y).item() for x, y in batches] for k, opt in opts.items()}
    torch.testing.assert_close(losses["flat"], losses["rows"], rtol=1e-10, atol=0)
    for block in ("emb", "proj"):
        for name, factor in opts["rows"].factors()[block].items():
            torch.testing.assert_close(opts["flat"].factors()[block][name], factor, rtol=1e-10, atol=1e-14)


def test_ekfac_over_flat_positions_of_uneven_bags_trains():
    """Before the layers over flat positions had no example rows, EKFAC reshaped the 12 positions of bags of 1, 5, 2
    and 4 to ``(4, 3, d)`` (the wrong examples), or failed where they did not divide."""
    torch.manual_seed(0)
    tokens, offsets, y = torch.randint(0, V, (12,)), torch.tensor([0, 1, 6, 8]), torch.tensor([0, 1, 2, 1])
    opt = curvgraph.compile(TokenProjection(), (tokens, offsets), method="ekfac", backend="eager", progress=False)
    losses = [opt.step((tokens, offsets), y).item() for _ in range(6)]
    assert "ekfac_rows_A_head" in opt.source and "ekfac_rows_A_proj" not in opt.source
    assert opt.skipped_steps == 0 and losses[-1] < losses[0], losses


class Positional(nn.Module):
    """A learned positional table added to a (N, T, D) stream, read at the first T of its 8 rows."""

    def __init__(self, rows: int = 8) -> None:
        super().__init__()
        self.pos = nn.Parameter(0.1 * torch.randn(1, rows, D))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(torch.tanh(x + self.pos[:, : x.shape[1]]).mean(1))


def test_positional_table_is_a_position_block_read_at_the_first_t_rows():
    torch.manual_seed(0)
    model = Positional().double()
    before = model.pos.detach().clone()
    x = torch.randn(4, 5, D, dtype=torch.float64)
    opt = curvgraph.compile(model, (x,), backend="eager", lr=0.1)
    block = opt.plan.block("pos")
    assert block.kind == "position" and opt.plan.fallback_params == ()
    assert block.factors["A"] == curvgraph.Factor((8,), axis=-2, diagonal=True) and block.matrix_shape == (8, D)
    opt.step(x, torch.randint(0, 3, (4,)))
    torch.testing.assert_close(opt.factors()["pos"]["A"], torch.tensor([0.2] * 5 + [0.0] * 3, dtype=torch.float64))
    assert torch.equal(model.pos[0, 5:], before[0, 5:]) and not torch.equal(model.pos[0, :5], before[0, :5])


def test_one_position_factors_are_the_exact_ggn():
    torch.manual_seed(0)
    model = Positional(rows=1).double()
    x, y = torch.randn(1, 1, D, dtype=torch.float64), torch.tensor([2])
    exact = exact_ggn(model, "cross_entropy", x, y, model.pos.detach().flatten(), lambda t: {"pos": t.reshape(1, 1, D)})
    opt = curvgraph.compile(model, (x,), fisher="type2", backend="eager", lr=0.1)
    opt.step(x, y)
    factors = opt.factors()["pos"]
    torch.testing.assert_close(torch.kron(torch.diag(factors["A"]), factors["G"]), exact)


class ClassToken(nn.Module):
    """ViT-style: ``k`` learned tokens concatenated in front of the patch sequence, read back at position 0."""

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        self.cls = nn.Parameter(0.1 * torch.randn(1, k, D))
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        h = torch.tanh(self.mix(h))
        return self.head(h[:, 0] + h.mean(1))  # position 0 and every position depend on the token


@pytest.mark.parametrize("k", [1, 2])
def test_class_token_is_a_position_block_read_at_the_first_k_rows(k):
    torch.manual_seed(0)
    model = ClassToken(k).double()
    x = torch.randn(4, 5, D, dtype=torch.float64)
    opt = curvgraph.compile(model, (x,), backend="eager", lr=0.1)
    block = opt.plan.block("cls")
    assert block.kind == "position" and opt.plan.fallback_params == ()
    assert block.factors["A"] == curvgraph.Factor((k,), axis=-2, diagonal=True) and block.matrix_shape == (k, D)
    assert "prepended tokens" in str(opt.plan)
    before = model.cls.detach().clone()
    opt.step(x, torch.randint(0, 3, (4,)))
    torch.testing.assert_close(opt.factors()["cls"]["A"], torch.full((k,), 1.0 / k, dtype=torch.float64))
    assert not torch.equal(model.cls, before) and opt.skipped_steps == 0


class TwoTokens(nn.Module):
    """DeiT-style: a class token of shape ``(d,)`` (CLIP's) and a distillation token ``(1, 1, d)`` after it, in one
    concatenation in front of the patch sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(0.1 * torch.randn(D))
        self.dist = nn.Parameter(0.1 * torch.randn(1, 1, D))
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        n = x.shape[0]
        h = torch.tanh(self.mix(torch.cat([self.cls.expand(n, 1, -1), self.dist.expand(n, -1, -1), x], 1)))
        return self.head(h[:, 0] + 2 * h[:, 1] + h.mean(1))


@pytest.mark.parametrize("model_cls, token, shape", [(ClassToken, "cls", (1, 1, D)), (TwoTokens, "cls", (D,)),
                                                     (TwoTokens, "dist", (1, 1, D))])
def test_class_token_factors_are_the_exact_ggn(model_cls, token, shape):
    """One token (k = 1): ``kron(A, G)`` with the type-2 Fisher is the token's exact GGN, over a batch; also a
    ``(d,)`` token, and one after another token (read at its own position)."""
    torch.manual_seed(0)
    model = model_cls().double()
    x, y = torch.randn(3, 4, D, dtype=torch.float64), torch.tensor([2, 0, 1])
    param = model.get_parameter(token)
    exact = exact_ggn(model, "cross_entropy", x, y, param.detach().flatten(), lambda t: {token: t.reshape(shape)})
    opt = curvgraph.compile(model, (x,), fisher="type2", backend="eager", lr=0.1)
    assert opt.plan.block(token).kind == "position" and opt.plan.fallback_params == ()
    opt.step(x, y)
    factors = opt.factors()[token]
    torch.testing.assert_close(torch.kron(torch.diag(factors["A"]), factors["G"]), exact)


class TokenTypes(nn.Module):
    """Tokens plus a token-type table of one row (RoBERTa's ``type_vocab_size=1``), mean-pooled into a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.types, self.head = nn.Embedding(10, 4), nn.Embedding(1, 4), nn.Linear(4, 3)

    def forward(self, ids):
        return self.head((self.tokens(ids) + self.types(torch.zeros_like(ids))).mean(1))


def test_a_table_of_one_row_compiles_with_inductor():
    """A one-row table is read at every position, so its ``A`` is ``[1]``; written as a scatter of ones into one
    element, torch 2.13's Inductor could not generate the CPU code of the step (an ``AssertionError`` in its
    vectorized store). Compiled, the step's loss is the eager step's."""
    ids, targets = torch.randint(0, 10, (6, 5), generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2] * 2)
    losses = {}
    for backend in ("eager", "inductor"):
        torch.manual_seed(0)
        model = TokenTypes()
        opt = curvgraph.compile(model, (ids,), backend=backend, seed=0, progress=False)
        losses[backend] = [opt.step(ids, targets) for _ in range(2)]
        assert opt.plan.block("types").kind == "embedding"
    torch.testing.assert_close(losses["inductor"], losses["eager"])


class RelativeBias(nn.Module):
    """Attention with a relative position bias, Swin's way: a ``(2T - 1, H)`` table read at the constant index
    ``i - j + T - 1`` of each query-key pair and added to the scores; ``lookup="index"`` reads it as ``table[index]``
    (Swin), ``"embedding"`` as ``F.embedding(index, table)`` (T5's ``nn.Embedding``)."""

    def __init__(self, lookup: str) -> None:
        super().__init__()
        self.lookup = lookup
        self.qkv, self.head = nn.Linear(4, 12), nn.Linear(4, 3)
        self.table = nn.Parameter(0.1 * torch.randn(2 * 5 - 1, 2))
        position = torch.arange(5)
        self.register_buffer("index", position[:, None] - position[None, :] + 4)

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = (z.view(n, t, 2, 2).transpose(1, 2) for z in self.qkv(x).split(4, -1))
        index = self.index.view(-1)
        rows = self.table[index] if self.lookup == "index" else torch.nn.functional.embedding(index, self.table)
        bias = rows.view(t, t, 2).permute(2, 0, 1)
        attention = ((q @ k.transpose(-2, -1)) / 2 + bias).softmax(-1) @ v
        return self.head(attention.transpose(1, 2).reshape(n, t, 4).mean(1))


def test_a_parameter_indexed_by_an_integer_tensor_is_an_embedding_block():
    """``table[index]`` is the lookup ``F.embedding(index, table)`` (Swin's relative position bias, T5's): the same
    embedding block, factors and steps in both spellings, at the defaults (float64, four steps)."""
    x = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    targets = torch.tensor([0, 1, 2] * 2)
    runs = {}
    for lookup in ("index", "embedding"):
        torch.manual_seed(0)
        model = RelativeBias(lookup).double()
        opt = curvgraph.compile(model, (x,), backend="eager", seed=0)
        assert opt.plan.block("table").kind == "embedding" and opt.plan.fallback_params == ()
        losses = [opt.step(x, targets) for _ in range(4)]
        runs[lookup] = (losses, opt.factors()["table"], [p.detach().clone() for p in model.parameters()])
    torch.testing.assert_close(runs["index"], runs["embedding"], rtol=1e-10, atol=1e-12)
