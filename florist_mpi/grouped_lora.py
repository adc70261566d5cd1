"""Grouped LoRA: the adapters of several clients on one frozen base, each client's on its own rows.

A group has S client slots. For every adapted nn.Linear W (m, n) of the base it holds the
slots' factors stacked, A (S, r, n) and B (S, m, r). While attached to the base (`attached`),
a forward hook on each adapted layer adds to the layer's output, for the rows of client g,

    delta_g = scaling · dropout_g(x_g) A_gᵀ B_gᵀ          x_g: client g's rows, (b, L, n)

which is PEFT's LoRA `lora_B(lora_A(dropout(x))) * scaling` (tests/test_client_batch.py
compares the two), computed for all the group's clients in two batched matrix products. The
rows are client-major: rows [j·b, (j+1)·b) of the batch belong to the j-th active client.
Nothing mixes rows of different clients: client g's loss reaches only A_g and B_g.

Dropout: each client's masks come from its own copy of the default generator's state, taken
where the one-at-a-time path's global generator stands when that client starts training, and
are drawn at the client's own padded length, in forward order, exactly as that path's
`nn.Dropout` draws them. They are therefore bitwise that path's masks. Positions beyond the
client's length are the group's extra padding and get mask 0.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# DeepSpeed's clip_grad_norm_ divides by (norm + 1e-6); per-client clipping keeps its formula.
CLIP_EPSILON = 1e-6


@dataclass(frozen=True)
class RowLayout:
    """How a group's batch is laid out: the active clients own consecutive blocks of `rows` rows,
    in order; `lengths[j]` is the j-th active client's own padded sequence length (its micro-batch
    as it would be alone) and `padded[j]` whether that micro-batch has padding of its own. Positions
    from lengths[j] to the batch's width are the group's extra padding."""

    rows: int
    lengths: tuple[int, ...]
    padded: tuple[bool, ...]

    @property
    def clients(self) -> int:
        return len(self.lengths)


def default_generator(device: torch.device) -> torch.Generator:
    """The generator torch's dropout draws from on `device`."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class DropoutStreams:
    """One dropout stream per client slot: masks as `F.dropout` draws them from the default generator,
    each client continuing from its own saved generator state (the default generator is restored)."""

    def __init__(self, p: float, device: torch.device):
        self.p, self.device = p, device
        self.generator = default_generator(device)
        self.states: dict[int, torch.Tensor] = {}

    def start(self, slot: int) -> None:
        """Slot `slot`'s masks continue from where the default generator stands now."""
        self.states[slot] = self.generator.get_state()

    def mask(self, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The slot's next mask, 0 or 1/(1-p), of `shape`: F.dropout of ones (bitwise dropout's own noise)."""
        saved = self.generator.get_state()
        self.generator.set_state(self.states[slot])
        try:
            noise = F.dropout(torch.ones(shape, device=self.device), self.p, training=True)
            self.states[slot] = self.generator.get_state()
        finally:
            self.generator.set_state(saved)
        return noise


class LoraProducts(torch.autograd.Function):
    """scaling · (x Aᵀ) Bᵀ for each client j: x (g, b·L, n) client-major, A (g, r, n), B (g, m, r) -> (g, b·L, m).

    The forward and the input gradient are batched matrix products (row by row what nn.Linear
    computes). A client's weight gradients are sums over its rows: they are taken one client at a
    time, over its own b × lengths[j] positions only, with the matrix product nn.Linear's backward
    uses, (grad)ᵀ · input, so each is summed exactly as that client's own training sums it (a batched
    product, or the group's extra padding, would split the sum differently, and Adam's update of a
    gradient near its ε magnifies such last-bit changes).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                layout: RowLayout) -> torch.Tensor:
        low = torch.bmm(x, A.transpose(1, 2))  # (g, b·L, r)
        ctx.save_for_backward(x, A, B, low)
        ctx.scaling, ctx.layout = scaling, layout
        return torch.bmm(low, B.transpose(1, 2)) * scaling

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, A, B, low = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        grad_product = grad * ctx.scaling  # (g, b·L, m): the gradient of the unscaled product
        d_x = d_A = d_B = None
        if need_B:
            d_B = torch.stack([_own(g_j, ctx.layout, j).t().mm(_own(low_j, ctx.layout, j))
                               for j, (g_j, low_j) in enumerate(zip(grad_product, low))])  # (g, m, r)
        if need_x or need_A:
            d_low = torch.bmm(grad_product, B)  # (g, b·L, r)
            if need_A:
                d_A = torch.stack([_own(d_j, ctx.layout, j).t().mm(_own(x_j, ctx.layout, j))
                                   for j, (d_j, x_j) in enumerate(zip(d_low, x))])  # (g, r, n)
            if need_x:
                d_x = torch.bmm(d_low, A)  # (g, b·L, n)
        return d_x, d_A, d_B, None, None


def _own(block: torch.Tensor, layout: RowLayout, j: int) -> torch.Tensor:
    """Client j's (b·L, k) block of rows cut to its own positions: (b · lengths[j], k)."""
    width = block.shape[0] // layout.rows
    if layout.lengths[j] == width:
        return block
    return block.view(layout.rows, width, -1)[:, : layout.lengths[j]].reshape(-1, block.shape[-1])


class GroupedLora(nn.Module):
    """Stacked LoRA factors of `slots` clients of one LoRA rank and scaling over the adapted modules.

    `shapes` maps module names (in model order) to (m, n). A[i] is (slots, r, n) and B[i] is
    (slots, m, r) for the i-th module; slot j's factors are A[i][j] and B[i][j].
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], slots: int, rank: int, scaling: float, dropout: float,
                 device: torch.device, train_A: bool = True):
        super().__init__()
        self.names = list(shapes)
        self.slots, self.rank, self.scaling = slots, rank, scaling
        self.A = nn.ParameterList(nn.Parameter(torch.zeros(slots, rank, n, device=device), requires_grad=train_A)
                                  for _, n in shapes.values())
        self.B = nn.ParameterList(nn.Parameter(torch.zeros(slots, m, rank, device=device))
                                  for m, _ in shapes.values())
        self.dropout = DropoutStreams(dropout, device) if dropout > 0 else None
        self.active: list[int] = []
        self.layout: RowLayout | None = None
        self._index: torch.Tensor | None = None  # None: every slot is active, in slot order

    # ------------------------------------------------------------------ slots

    def factors(self, slot: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Views (no autograd) of slot `slot`'s factors: module name -> (A (r, n), B (m, r))."""
        return {name: (A.detach()[slot], B.detach()[slot]) for name, A, B in zip(self.names, self.A, self.B)}

    def set_rows(self, active: list[int], layout: RowLayout) -> None:
        """The next forward's batch: the slots `active` own the layout's blocks of rows, in this order."""
        self.active, self.layout = list(active), layout
        everyone = self.active == list(range(self.slots))
        self._index = None if everyone else torch.tensor(self.active, device=self.A[0].device)

    # ------------------------------------------------------------------ forward

    @contextmanager
    def attached(self, base_model: nn.Module) -> Iterator[None]:
        """Forward hooks on the base's adapted layers for the duration of the block."""
        handles = [base_model.get_submodule(name).register_forward_hook(self._hook(i))
                   for i, name in enumerate(self.names)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, index: int):
        def add_delta(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return (output + self.delta(index, args[0])).to(output.dtype)  # PEFT: result.to(base dtype)

        return add_delta

    def delta(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """scaling · dropout(x) Aᵀ Bᵀ of module `index`, each active client's factors on its own rows.

        x: (g·b, L, n) with g active clients of b rows each; returns (g·b, L, m).
        """
        A, B = self.A[index], self.B[index]
        if self._index is not None:
            A, B = A.index_select(0, self._index), B.index_select(0, self._index)
        x = x.to(A.dtype)
        if self.dropout is not None:
            x = x * self._masks(x.shape)
        out = LoraProducts.apply(x.reshape(len(self.active), -1, x.shape[-1]), A, B, self.scaling, self.layout)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _masks(self, shape: torch.Size) -> torch.Tensor:
        """(g·b, L, n) dropout masks: client j's drawn at (b, its length, n), zero on the group's extra padding."""
        layout = self.layout
        masks = torch.zeros(layout.clients, layout.rows, shape[1], shape[2], device=self.A[0].device)
        for j, (slot, length) in enumerate(zip(self.active, layout.lengths)):
            masks[j, :, :length] = self.dropout.mask(slot, (layout.rows, length, shape[2]))
        return masks.reshape(shape)

    # ------------------------------------------------------------------ gradients

    @torch.no_grad()
    def clip_per_client_(self, max_norm: float) -> torch.Tensor:
        """Clip each active slot's gradients by its own norm, as DeepSpeed's clip_grad_norm_ clips one
        client's: the norm of each factor's gradient in PEFT's parameter order (per module A, then B),
        combined as (Σ norm²)^(1/2); coefficient min(1, max_norm / (norm + 1e-6)). No norm is taken
        across clients. Returns the (active,) coefficients; slots without a batch this step keep theirs."""
        grads = [p.grad for pair in zip(self.A, self.B) for p in pair if p.grad is not None]
        if not grads:
            return torch.ones(len(self.active))
        index = torch.tensor(self.active, device=grads[0].device)
        rows = [g.index_select(0, index) for g in grads]  # each (g, ...): the active clients' gradients
        norms = torch.stack([r.float().flatten(1).norm(2, dim=1) for r in rows], dim=1)  # (g, factors)
        total = norms.pow(2.0).sum(dim=1).float().pow(1.0 / 2.0)  # (g,)
        coefficients = torch.tensor([float(max_norm)], device=total.device) / (total + CLIP_EPSILON)
        coefficients = torch.min(torch.tensor([1.0], device=total.device), coefficients)
        for g, r in zip(grads, rows):
            g.index_copy_(0, index, r * coefficients.view(-1, *([1] * (r.dim() - 1))).to(r.dtype))
        return coefficients
