"""Each client's attention over its own rows and its own length, as in its one-at-a-time training.

A group's batch pads every client's micro-batch to the group's longest. Everything in a decoder
computes each position on its own, except attention, whose kernel (PyTorch's SDPA on CPU) sums
over the padded key length in blocks that depend on that length: the extra padding would change
a client's attention in the last bits. While `per_client_attention` is active, the model's
`sdpa` attention runs once per client on that client's rows cut back to its own length, with its
own mask, or with none (SDPA's causal kernel) where its micro-batch has no padding, which is what
transformers does for a batch without padding. The rows of the group's extra padding get zeros:
no real position attends to them, and they carry no loss.

Models on `eager` attention need nothing (its sums do not depend on the padded length:
tests/test_client_batch.py); other implementations run unchanged, equal to the one-at-a-time
path to rounding.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from florist_mpi.grouped_lora import RowLayout


@contextmanager
def per_client_attention(model: torch.nn.Module, layout: RowLayout) -> Iterator[None]:
    """For the block, the model's `sdpa` attention split by client (module docstring)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        yield
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def split_sdpa(module, query, key, value, attention_mask, **kwargs):
        """query (g·b, heads, L, d), key/value (g·b, kv heads, L, d), mask (g·b or 1, 1, L, L) or None
        -> ((g·b, L, heads, d), None): each client's rows at its own length; clients of one length and
        mask kind share a call (rows of a batch are computed independently)."""
        width = query.shape[2]
        pieces = list(zip(query.split(layout.rows), key.split(layout.rows), value.split(layout.rows)))
        masks = [_own_mask(attention_mask, layout, j) for j in range(layout.clients)]
        buckets: dict[tuple[int, bool], list[int]] = {}
        for j, mask in enumerate(masks):
            buckets.setdefault((layout.lengths[j], mask is None), []).append(j)
        outputs: list[torch.Tensor | None] = [None] * layout.clients
        for (length, causal), members in buckets.items():
            q, k, v = (torch.cat([pieces[j][t][:, :, :length] for j in members]) for t in range(3))
            mask = None if causal else torch.cat([masks[j] for j in members])
            out, _ = sdpa(module, q, k, v, mask, **kwargs)  # (len(members)·b, length, heads, d)
            for j, own in zip(members, out.split(layout.rows)):
                outputs[j] = F.pad(own, (0, 0, 0, 0, 0, width - length))
        return torch.cat(outputs), None

    ALL_ATTENTION_FUNCTIONS["sdpa"] = split_sdpa
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa


def _own_mask(mask: torch.Tensor | None, layout: RowLayout, j: int) -> torch.Tensor | None:
    """Client j's attention mask as its own batch would have it: its rows and length, or None (causal)
    where that batch has no padding and the mask is the plain causal one."""
    if mask is None:
        return None
    length = layout.lengths[j]
    rows = slice(j * layout.rows, (j + 1) * layout.rows) if mask.shape[0] > 1 else slice(None)
    own = mask[rows, :, :length, :length]
    if not layout.padded[j] and own.dtype == torch.bool:
        causal = torch.ones(length, length, dtype=torch.bool, device=own.device).tril()
        if bool((own == causal).all()):
            return None
    return own
