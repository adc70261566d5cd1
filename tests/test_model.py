"""Base-model helpers: merging updates into low-precision weights, device and thread choice."""
import numpy as np
import torch

from florist_mpi.model import float32_masters, merge_update


def test_merges_into_bfloat16_weights_go_through_float32_masters():
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(64, 48, generator=g) * 0.02).to(torch.bfloat16).float()  # a bf16 checkpoint
    rounds = [(np.asarray(torch.randn(64, 2, generator=g) * 1e-2), np.asarray(torch.randn(2, 48, generator=g) * 1e-2))
              for _ in range(20)]
    exact = w0.double() + sum(torch.from_numpy(B).double() @ torch.from_numpy(A).double() for B, A in rounds)

    with_masters = {"m": torch.nn.Linear(48, 64, bias=False).to(torch.bfloat16)}
    naive = {"m": torch.nn.Linear(48, 64, bias=False).to(torch.bfloat16)}
    for modules in (with_masters, naive):
        with torch.no_grad():
            modules["m"].weight.copy_(w0)
    masters = float32_masters(with_masters)
    assert set(masters) == {"m"} and masters["m"].dtype == torch.float32
    for B, A in rounds:
        merge_update(with_masters, {"m": (B, A)}, masters)
        merge_update(naive, {"m": (B, A)})
    update = (exact - w0.double()).norm()
    # the master holds the exact sum (to float32), the weight is its bfloat16 rounding
    assert (masters["m"].double() - exact).norm() / update < 1e-5
    assert torch.equal(with_masters["m"].weight, masters["m"].to(torch.bfloat16))
    error_masters = (with_masters["m"].weight.double() - exact).norm() / update
    error_naive = (naive["m"].weight.double() - exact).norm() / update
    assert error_masters < error_naive / 2, (error_masters, error_naive)


def test_float32_weights_need_no_masters():
    assert float32_masters({"m": torch.nn.Linear(4, 3)}) == {}
