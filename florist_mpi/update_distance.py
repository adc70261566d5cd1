"""Frobenius distances to an exact low-rank update, without forming any m×n matrix.

The exact update of one module is ΔW = Σ_k p_k B_k A_k = B_s A_s with the stacks
B_s = [B_1 … B_K] (m×R) and A_s = [p_1 A_1; …; p_K A_K] (R×n). `ExactUpdate` keeps it as
Q · core: Q (m×q, orthonormal columns, the thin QR of B_s) and core = T A_s (q×n), so that
‖ΔW‖_F = ‖core‖_F. The distance of any factored update B A (B m×g, A g×n) to it splits B
into its part in the span of Q and the rest:

    B = Q C + P,   C = Qᵀ B (q×g),   Qᵀ P = 0   (classical Gram–Schmidt, applied twice)
    B A − ΔW = Q (C A − core) + P A,  the two terms orthogonal, so
    ‖B A − ΔW‖²_F = ‖C A − core‖²_F + ‖T_P A‖²_F   with P = Q_P T_P its thin QR.

A truncation to the first r columns of B and rows of A is the same with C[:, :r] and T_P[:, :r]
(P[:, :r] = Q_P T_P[:, :r]), so every client's prefix costs one (q + g)×r by r×n product.
Cost per module: O(m R² + m g (R + g) + (R + g) g n); memory O(m (R + g)). Unlike the Gram
form ‖X‖² = tr(XᵀX …), nothing is squared before the subtraction, so exact methods measure at
the float32 rounding of their factors (~1e-7), not at the square root of float64's epsilon.
Pure math (float64 torch), no I/O.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch


class ExactUpdate:
    """ΔW = Σ_k p_k B_k A_k of one module, held as Q · core (module docstring)."""

    def __init__(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], p: Sequence[float]):
        if len(pairs) != len(p) or not pairs:
            raise ValueError(f"{len(pairs)} client factor pairs but {len(p)} weights")
        B_s = torch.cat([B.double() for B, _ in pairs], dim=1)  # m × R
        A_s = torch.cat([float(pk) * A.double() for (_, A), pk in zip(pairs, p)], dim=0)  # R × n
        self.Q, T = torch.linalg.qr(B_s)  # Q m × q, T q × R, q = min(m, R)
        self.core = T @ A_s  # q × n: ΔW = Q @ core
        self.norm = float(torch.linalg.matrix_norm(self.core))

    def distances(
        self, B: torch.Tensor, A: torch.Tensor, prefixes: Iterable[int] = ()
    ) -> tuple[float, dict[int, float]]:
        """(‖B A − ΔW‖_F, {r: ‖B[:, :r] A[:r] − ΔW‖_F for each r in `prefixes`})."""
        B, A = B.double(), A.double()
        if B.shape[1] == 0:  # no global update: the distance is ΔW itself
            return self.norm, {r: self.norm for r in prefixes}
        C = self.Q.T @ B  # q × g
        P = B - self.Q @ C
        again = self.Q.T @ P  # the second Gram–Schmidt pass removes what rounding left in span(Q)
        C += again
        P -= self.Q @ again
        T_P = torch.linalg.qr(P, mode="r")[1]  # min(m, g) × g
        full = self._distance(C, T_P, A)
        return full, {r: self._distance(C[:, :r], T_P[:, :r], A[:r]) for r in sorted(set(prefixes))}

    def _distance(self, C: torch.Tensor, T_P: torch.Tensor, A: torch.Tensor) -> float:
        inside = torch.linalg.matrix_norm(C @ A - self.core)
        outside = torch.linalg.matrix_norm(T_P @ A) if A.shape[0] else torch.zeros((), dtype=torch.float64)
        return math.hypot(float(inside), float(outside))
