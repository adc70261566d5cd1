"""The low-rank math of aggregating client LoRA factors: FLoRIST and the baselines.

Pure math on torch tensors: no MPI, no DeepSpeed, no I/O. The methods (florist_mpi.methods)
call these kernels; `florist_mpi.aggregation.aggregate(method, factors, n_k, tau=...)` is the
entry point by name. Every kernel works on one module's `ClientStack` (florist_mpi.clientstack):
B_s = [B_1 … B_K] (m×R) and A_s = [A_1; …; A_K] (R×n), R = Σ r_k, with ΔW_k = B_k A_k (LoRA
scaling folded into B_k), and p, the float64 weights p_k = n_k / Σ n (K,). Per-client work is
index arithmetic over the R columns, never a loop over clients.

FLoRIST (arXiv 2506.09199) never forms the m×n update. With p_k folded into A_k, ΔW = B_s A_s,
and the global adapter is ΔW's SVD truncated to the smallest rank holding τ of its energy.
The default route ("gram") gets it from two float64 Gram matrices of the stacks (symmetric:
one triangle formed, `symmetric_gram`), a Cholesky factor and one R×R eigenproblem, truncates to
r_g, and only then multiplies the stacks by R×r_g matrices; about 4× fewer flops and far less
LAPACK time than the paper's three thin SVDs, which are kept as `route="svd"`, the reference.
Both routes first rescale each client to ‖B_k‖ = ‖p_k A_k‖ (which leaves ΔW unchanged) and drop
clients that contribute nothing.

Accuracy: the Gram route resolves singular values down to about 1e-8 of the largest (float64
squared); smaller ones carry less than 1e-16 of the energy. A stack too ill-conditioned for a
Cholesky factor takes the cheaper exact alternative by the cost model (`costmodel.gram_fallback`):
the dense route near the fill limit, an exact SVD basis of the m×R stack well below it.

The Gram route grows like R³ once many clients take part. The "dense" route is bounded for any R:
it forms ΔW (m×n, float64) once, block of columns by block, takes the eigendecomposition of its
smaller Gram (min(m, n) square), truncates, and projects ΔW on the kept singular vectors. "auto"
picks, per module, the cheaper of the two by the one cost model (florist_mpi.costmodel), which
also prices owner balancing and the simulated clock.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from florist_mpi.clientstack import (  # noqa: F401 - re-exported: the stacked input form
    ClientStack,
    Factors,
    check_finite,
    check_stack,
    normalised_weights,
    stack_factors,
    weight_vector,
)
from florist_mpi.costmodel import (  # noqa: F401 - re-exported: the one cost model
    EIGH_FLOPS_PER_CUBE,
    GRAM_CORE_FLOPS_PER_CUBE,
    GRAM_MAX_FILL,
    RoutePlan,
    exact_route,
    florist_plan,
    gram_fallback,
    gram_strips,
    route_costs,
)

ROUTES = ("auto", "gram", "dense", "svd")
# Relative energy below which the tail of a spectrum counts as numerical zero. Its
# Frobenius contribution is at most 1e-6 of ‖ΔW‖, far below float32 resolution of ΔW.
ZERO_ENERGY = 1e-12
# A stack direction whose singular value is below this fraction of the largest is
# treated as absent (Gram eigenvalues in float64 resolve about 1e-8 in σ).
STACK_RTOL = 1e-7
# ΔW is accumulated from column blocks of the stacks of about this many bytes in float64 (and at
# least DENSE_BLOCK_COLUMNS columns, so that each GEMM stays wide): it bounds the float64 copies.
# Measured on the shared 2-core machine with 10,000 rank-8 clients of the demo model
# (benchmarks/aggregation_many.py), against the batched einsum: quiet, 8 MiB blocks (cache-resident)
# took 1.0× its time and 64 MiB 1.3×; under load from other processes, 8 MiB took 6.9×, 16 MiB
# 4.4×, 64 MiB 3.3–3.4× and 128–512 MiB 3.1× (every op is a parallel region that waits for its
# slowest thread, so fewer ops win). Large blocks are the robust choice.
DENSE_BLOCK_BYTES = 128 << 20
DENSE_BLOCK_COLUMNS = 512
# A Cholesky factor is used only while the stack's condition number (Frobenius estimate)
# stays below this: the Gram route's basis loses orthogonality like eps · cond², so this
# keeps singular values accurate to ~1e-6 relative.
CHOLESKY_MAX_COND = 1e5


@dataclass
class AggregationResult:
    """One module's global factors. Contract (methods/base.py): rank == B.shape[1] == A.shape[0]."""

    B: torch.Tensor  # m × r_g global factor, ΔW_global ≈ B @ A
    A: torch.Tensor  # r_g × n
    rank: int
    singular_values: torch.Tensor  # spectrum the rank was chosen from (float64)
    energy: float  # retained fraction Σ_{i≤r_g} σ_i² / Σ σ_i²
    client_ranks: torch.Tensor | None = None  # flexlora, hetlora: client k receives the rank-client_ranks[k] prefix
    padded: bool = False  # fedit, fedex, hetlora: heterogeneous ranks were zero-padded to the largest
    method: str = ""
    # fedex: low-rank factors (m × q, q × n) of the part of ΔW that B @ A misses; the round's global
    # update is B @ A + residual[0] @ residual[1] (the residual is folded into the base)
    residual: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def client_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """flexlora: each client's (B[:, :r], A[:r]) prefix views (built on access)."""
        if self.client_ranks is None:
            return None
        return [(self.B[:, :r], self.A[:r]) for r in self.client_ranks.tolist()]


def check_options(tau: float, max_rank, route: str) -> None:
    """tau in (0, 1], max_rank a positive integer or None, route one of ROUTES."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or math.isnan(tau) or not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau!r}: pass a number such as 0.9")
    if max_rank is not None and (
        isinstance(max_rank, bool) or not isinstance(max_rank, numbers.Integral) or max_rank < 1
    ):
        raise ValueError(f"max_rank must be a positive integer or None, got {max_rank!r}")
    if route not in ROUTES:
        raise ValueError(f"unknown route '{route}': use one of {', '.join(ROUTES)}")


# ------------------------------------------------------------------- rank rule


def select_rank(singular_values, tau: float, max_rank: int | None = None) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ tau · Σ σ_i² (σ sorted descending); 0 for a zero spectrum."""
    values = (
        singular_values
        if isinstance(singular_values, list)
        else torch.as_tensor(singular_values, dtype=torch.float64).reshape(-1).tolist()
    )
    energies = _relative_energies(values)
    total = math.fsum(energies)
    if total <= 0.0:
        return 0
    # A hair below tau so that tau = 1 keeps every direction that carries energy.
    target = tau * (1.0 - ZERO_ENERGY) * total
    rank, running = len(energies), 0.0
    for k, energy in enumerate(energies, start=1):
        running += energy
        if running >= target:
            rank = k
            break
    return min(rank, max_rank) if max_rank is not None else rank


def _relative_energies(values: list[float]) -> list[float]:
    """σ_i² / σ_max²: the energy shares without overflow for any representable σ."""
    largest = max((abs(float(s)) for s in values), default=0.0)
    return [(float(s) / largest) ** 2 for s in values] if largest > 0 else [0.0 for _ in values]


def retained(singular_values: torch.Tensor, rank: int) -> float:
    energies = _relative_energies(singular_values.reshape(-1).tolist())
    total = math.fsum(energies)
    return 1.0 if total <= 0.0 else math.fsum(energies[:rank]) / total


# ------------------------------------------------------------------- shared kernels


def symmetric_gram(X: torch.Tensor) -> torch.Tensor:
    """XᵀX (w×w) for a rows×w X, forming only its upper triangle when w is wide enough.

    Torch has no syrk, so the triangle is formed in b = costmodel.gram_strips(w) strips of
    columns: strip i is X_iᵀ [X_i … X_last], one GEMM each, (1 + 1/b)/2 of a full GEMM's flops;
    the lower triangle is then mirrored. One strip is the plain GEMM.
    """
    width = X.shape[1]
    strips = gram_strips(width)
    if strips == 1:
        return X.T @ X
    G = torch.empty(width, width, dtype=X.dtype, device=X.device)
    step = -(-width // strips)
    for start in range(0, width, step):
        G[start : start + step, start:] = X[:, start : start + step].T @ X[:, start:]
    upper = G.triu(1)
    return G.triu_().add_(upper.T)


def thin_product(X: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """X @ M for a tall X and a thin M (few columns), as (Mᵀ Xᵀ)ᵀ: MKL runs that shape about 3×
    faster on CPU (4096×152 times 152×28: 1.3 ms against 4.2 ms, one thread). A transposed view."""
    return (M.T @ X.T).T


def _out(X: torch.Tensor, out_dtype) -> torch.Tensor:
    """A result factor: contiguous, in the results' dtype (one copy at most; `to` alone keeps a
    transposed layout when the dtype already matches)."""
    if X.dtype == out_dtype:
        return X.contiguous()
    return X.to(out_dtype, memory_format=torch.contiguous_format)


def _client_scales(norm_B: torch.Tensor, norm_A: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-client scales (c_k, p_k / c_k) that give c_k B_k and (p_k / c_k) A_k equal norms (K,) each.

    ΔW = Σ (c_k B_k)(p_k A_k / c_k) for any c_k > 0, so the sum is unchanged. Balancing makes
    each stack's numerical-rank cut independent of how a client split ΔW_k between B_k and
    A_k. A client with p_k = 0 or a zero factor adds nothing and gets scale 0 (to be dropped).
    """
    weighted = p * norm_A
    live = (norm_B > 0) & (weighted > 0)
    c = torch.where(live, weighted.sqrt() / norm_B.sqrt(), torch.zeros_like(p))
    d = torch.where(live, p / torch.where(live, c, torch.ones_like(c)), torch.zeros_like(p))
    return c, d


def _zero_result(m, n, like: torch.Tensor, out_dtype, method, spectrum=None) -> AggregationResult:
    empty_spectrum = torch.zeros(0, dtype=torch.float64, device=like.device)
    return AggregationResult(
        torch.zeros(m, 0, dtype=out_dtype, device=like.device),
        torch.zeros(0, n, dtype=out_dtype, device=like.device),
        0,
        empty_spectrum if spectrum is None else spectrum,
        1.0,
        method=method,
    )


def _positive_width(stack: ClientStack, p: torch.Tensor) -> int:
    """Σ r_k over the clients with p_k > 0."""
    return int(torch.dot(stack.ranks, (p > 0).cpu().to(torch.int64)))


# ------------------------------------------------------- FLoRIST's Gram route


def _cholesky_factor(G: torch.Tensor):
    """(C, C⁻¹) with G = CᵀC, C upper triangular, or None when G is too ill-conditioned."""
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        return None
    L_inv = torch.linalg.solve_triangular(L, torch.eye(G.shape[0], dtype=G.dtype, device=G.device), upper=False)
    condition = float(L.norm() * L_inv.norm())  # ≥ cond₂(stack); NaN/Inf when singular
    if not condition <= CHOLESKY_MAX_COND:
        return None
    return L.T, L_inv.T


def _svd_basis(X: torch.Tensor):
    """(Q, C) with X ≈ Q C on X's numerically nonzero directions, Q orthonormal (thin SVD)."""
    U, s, Vh = torch.linalg.svd(X, full_matrices=False)
    keep = s > STACK_RTOL * s[:1].clamp(min=torch.finfo(s.dtype).tiny)
    return U[:, keep], s[keep, None] * Vh[keep]


def _spectral_core(K: torch.Tensor, tau: float, max_rank):
    """Eigen-decomposition of the PSD core K = M Mᵀ: (U_r, σ descending, chosen rank r)."""
    eigenvalues, U = torch.linalg.eigh(K)  # ascending
    sigma = eigenvalues.flip(-1).clamp(min=0.0).sqrt()
    sigma_values = sigma.tolist()
    rank = select_rank(sigma_values, tau, max_rank)
    rank = min(rank, sum(1 for s in sigma_values if s > 0))  # never divide by a zero singular value
    return U[:, U.shape[1] - rank :].flip(-1), sigma, rank


def _florist_gram(stack: ClientStack, p, tau, max_rank, out_dtype) -> AggregationResult | None:
    """FLoRIST through float64 Gram matrices; None if they overflow (the caller falls back).

    With B_s = Q_B C_B (C_B from the Cholesky factor of B_sᵀB_s) and M = C_B A_s,
    ΔW = Q_B M, so ΔW's left singular vectors are Q_B U and its singular values σ
    come from the R×R eigenproblem M Mᵀ = C_B (A_s A_sᵀ) C_Bᵀ = U diag(σ²) Uᵀ.
    Truncated to r_g first, the outputs are two thin products over the stacks:
        B_g = Q_B U_r diag(σ_r) = B_s (C_B⁻¹ U_r diag(σ_r)),   A_g = diag(σ_r)⁻¹ U_rᵀ C_B A_s,
    which is the same rank-r_g truncated SVD of ΔW that FLoRIST's three SVDs give.
    """
    (m, n), like = stack.shape, stack.B
    B_s, A_s = stack.B.to(torch.float64), stack.A.to(torch.float64)  # read only: may be the caller's
    G_B, G_A = symmetric_gram(B_s), symmetric_gram(A_s.T)
    squares_B, squares_A = G_B.diagonal(), G_A.diagonal()
    # |G_ij| ≤ √(G_ii G_jj): finite diagonals mean finite Grams (NaN/Inf inputs show up here).
    if not bool(torch.isfinite(squares_B).all() & torch.isfinite(squares_A).all()):
        return None
    c, d = _client_scales(stack.segment_sum(squares_B).sqrt(), stack.segment_sum(squares_A).sqrt(), p)
    live = c > 0
    if not bool(live.all()):  # rare: drop the clients that add nothing, then start again without them
        if not bool(live.any()):
            return _zero_result(m, n, like, out_dtype, "florist")
        return _florist_gram(stack.select(live), p[live], tau, max_rank, out_dtype)
    w_B, w_A = stack.per_column(c), stack.per_column(d)
    G_B.mul_(w_B[:, None] * w_B[None, :])
    G_A.mul_(w_A[:, None] * w_A[None, :])
    cholesky = _cholesky_factor(G_B)
    if cholesky is None:
        if gram_fallback(m, n, stack.width) == "dense":  # near the fill limit: the dense route is cheaper
            return _florist_dense(stack, p, tau, max_rank, out_dtype)
        Q_B, C_B = _svd_basis(B_s * w_B)  # well below it: an exact orthonormal basis of the m×R stack
    else:
        C_B, C_B_inv = cholesky
    U_r, sigma, rank = _spectral_core(C_B @ G_A @ C_B.T, tau, max_rank)
    if rank == 0:
        return _zero_result(m, n, like, out_dtype, "florist", sigma)
    sigma_r = sigma[:rank]
    if cholesky is None:
        B_g = thin_product(Q_B, U_r * sigma_r)
    else:
        B_g = thin_product(B_s, w_B[:, None] * (C_B_inv @ (U_r * sigma_r)))
    A_g = (((U_r / sigma_r).T @ C_B) * w_A) @ A_s
    return AggregationResult(_out(B_g, out_dtype), _out(A_g, out_dtype), rank, sigma, retained(sigma, rank),
                             method="florist")


# ------------------------------------------------------- FLoRIST's reference route: three SVDs


def _client_norms(X: torch.Tensor, stack: ClientStack, dim: int) -> torch.Tensor:
    """Per-client Frobenius norms of X's column (dim=0) or row (dim=1) blocks, without overflow (K,)."""
    largest = torch.zeros(stack.count, dtype=X.dtype, device=X.device)
    largest.scatter_reduce_(0, stack.column_client, X.abs().amax(dim=dim), reduce="amax")
    scale = stack.per_column(torch.where(largest > 0, largest, torch.ones_like(largest)))
    scaled = X / (scale[None, :] if dim == 0 else scale[:, None])
    return largest * stack.segment_sum(scaled.square().sum(dim=dim)).sqrt()


def _balanced_stacks(stack: ClientStack, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 stacks of the clients that add something, each balanced (see _client_scales)."""
    B_s, A_s = stack.B.to(torch.float64), stack.A.to(torch.float64)
    c, d = _client_scales(_client_norms(B_s, stack, 0), _client_norms(A_s, stack, 1), p)
    columns = stack.per_column(c > 0)
    return (B_s * stack.per_column(c))[:, columns], (A_s * stack.per_column(d)[:, None])[columns]


def _truncated_core(core: torch.Tensor, tau: float, max_rank):
    """SVD of the small core cut to the energy rank: (U_r·S_r, Vh_r, full spectrum, rank)."""
    if core.numel() == 0:
        return None, None, torch.zeros(0, dtype=torch.float64, device=core.device), 0
    U_P, S_P, Vh_P = torch.linalg.svd(core, full_matrices=False)
    rank = select_rank(S_P, tau, max_rank)
    return U_P[:, :rank] * S_P[:rank], Vh_P[:rank], S_P, rank


def _florist_svd(stack: ClientStack, p, tau, max_rank, out_dtype) -> AggregationResult:
    """Reference: the paper's three thin SVDs (stacks, then core), truncated before forming."""
    B_s, A_s = _balanced_stacks(stack, p)
    m, n = stack.shape
    if B_s.shape[1] == 0:
        return _zero_result(m, n, B_s, out_dtype, "florist")
    U_B, C_B = _svd_basis(B_s)  # C_B = S_B V_Bᵀ
    V_A, C_A = _svd_basis(A_s.T)  # A_s = C_Aᵀ V_Aᵀ with C_Aᵀ = U_A S_A
    left, right, spectrum, rank = _truncated_core(C_B @ C_A.T, tau, max_rank)
    if rank == 0:
        return _zero_result(m, n, B_s, out_dtype, "florist", spectrum)
    return AggregationResult(
        _out(U_B @ left, out_dtype),
        _out(right @ V_A.T, out_dtype),
        rank,
        spectrum,
        retained(spectrum, rank),
        method="florist",
    )


# ------------------------------------------------------- FLoRIST's dense route


def dense_update(stack: ClientStack, p: torch.Tensor) -> torch.Tensor:
    """ΔW = Σ_k p_k B_k A_k = B_s diag(p per column) A_s (m×n, float64).

    Column blocks of about DENSE_BLOCK_BYTES are copied into two float64 buffers allocated once
    (converting on the way; a fresh large allocation per block costs its page faults every time),
    p folded into the smaller factor, and multiplied into ΔW. Zero-weight clients add exact zeros
    (their factors are finite: NaN/Inf show up in ΔW).
    """
    (m, n), width = stack.shape, stack.width
    delta = torch.zeros(m, n, dtype=torch.float64, device=stack.B.device)
    p_column = stack.per_column(p)
    step = min(width, max(DENSE_BLOCK_COLUMNS, DENSE_BLOCK_BYTES // (8 * (m + n))))
    # buffers in the stacks' own layout, so that each copy is a plain conversion
    B_buffer = torch.empty_like(stack.B[:, :step], dtype=torch.float64)
    A_buffer = torch.empty_like(stack.A[:step], dtype=torch.float64)
    for start in range(0, width, step):
        stop = min(start + step, width)
        B_block = B_buffer[:, : stop - start].copy_(stack.B[:, start:stop])
        A_block = A_buffer[: stop - start].copy_(stack.A[start:stop])
        if m <= n:
            B_block.mul_(p_column[None, start:stop])
        else:
            A_block.mul_(p_column[start:stop, None])
        delta.addmm_(B_block, A_block)
    return delta


def _scaled_float64(X: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """X * scale in float64 as a new tensor (X may be the caller's: never written)."""
    if X.dtype == torch.float64:
        return X * scale
    return X.to(torch.float64).mul_(scale)  # two passes, but ~10× faster than one mixed-dtype multiply on CPU


def _smaller_gram_eigh(X: torch.Tensor, vectors: bool = True):
    """Eigen-decomposition of X Xᵀ (m ≤ n) or Xᵀ X (m > n): (σ descending, vectors or None)."""
    G = symmetric_gram(X.T) if X.shape[0] <= X.shape[1] else symmetric_gram(X)  # s × s, s = min(m, n)
    if not vectors:
        return torch.linalg.eigvalsh(G).flip(-1).clamp(min=0.0).sqrt(), None
    eigenvalues, V = torch.linalg.eigh(G)  # ascending
    return eigenvalues.flip(-1).clamp(min=0.0).sqrt(), V


def _live_width(stack: ClientStack, p: torch.Tensor) -> int:
    """Σ r_k over the clients that add something (p_k > 0, B_k and A_k nonzero): ΔW's rank bound."""
    nonzero_B = stack.segment_sum((stack.B != 0).any(dim=0).to(torch.int64)) > 0
    nonzero_A = stack.segment_sum((stack.A != 0).any(dim=1).to(torch.int64)) > 0
    return int(torch.dot(stack.ranks, (nonzero_B & nonzero_A & (p > 0)).cpu().to(torch.int64)))


def _florist_dense(stack: ClientStack, p, tau, max_rank, out_dtype) -> AggregationResult:
    """FLoRIST through ΔW: its truncated SVD from the eigenvectors of its smaller Gram.

    With X = ΔW / max|ΔW| (so that the Gram cannot overflow) and m ≤ n, X Xᵀ = U diag(σ²) Uᵀ
    gives B_g = U_r diag(σ_r) and A_g = diag(σ_r)⁻¹ U_rᵀ X = V_rᵀ (for m > n the roles swap:
    A_g = V_rᵀ, B_g = X V_r). Either way B_g A_g is ΔW projected on the kept singular
    vectors, the same rank-r_g truncated SVD as the Gram route, in the same B = UΣ, A = Vᵀ
    split. The spectrum is cut at ΔW's largest possible rank, min(R of the clients that add
    something, m, n), as the Gram route's is.
    """
    (m, n), like = stack.shape, stack.B
    X = dense_update(stack, p)
    if not bool(torch.isfinite(X).all()):
        check_finite(stack)  # raises, naming the client with NaN/Inf
        return _florist_svd(stack, p, tau, max_rank, out_dtype)  # finite factors whose product overflows
    scale = float(X.abs().max())
    if scale == 0.0:
        return _zero_result(m, n, like, out_dtype, "florist")
    X.div_(scale)
    sigma, V = _smaller_gram_eigh(X)
    # The clients that add something bound ΔW's rank. Finding the all-zero ones takes a pass over the
    # stacks, cheap next to forming ΔW while R < 2 min(m, n); wider stacks are cut at the weighted
    # clients' width (were they mostly all-zero clients, the tail would hold float64 noise, ~1e-8 σ_1).
    bound = _positive_width(stack, p)
    if bound < 2 * min(m, n):
        bound = _live_width(stack, p)
    sigma = sigma[: min(bound, m, n)]
    sigma_values = sigma.tolist()
    rank = select_rank(sigma_values, tau, max_rank)
    rank = min(rank, sum(1 for s in sigma_values if s > 0))  # never divide by a zero singular value
    spectrum = sigma * scale
    if rank == 0:
        return _zero_result(m, n, like, out_dtype, "florist", spectrum)
    V_r, sigma_r = V[:, V.shape[1] - rank :].flip(-1), sigma[:rank]
    if m <= n:
        B_g, A_g = V_r * (sigma_r * scale), (V_r / sigma_r).T @ X
    else:
        B_g, A_g = thin_product(X, V_r) * scale, V_r.T
    return AggregationResult(
        _out(B_g, out_dtype), _out(A_g, out_dtype), rank, spectrum, retained(spectrum, rank), method="florist"
    )


def florist(stack: ClientStack, p: torch.Tensor, tau: float, max_rank, route: str, out_dtype) -> AggregationResult:
    (m, n) = stack.shape
    if route == "auto":
        route = florist_plan(m, n, _positive_width(stack, p), 0).route
    if route == "dense":
        return _florist_dense(stack, p, tau, max_rank, out_dtype)
    if route == "gram":
        result = _florist_gram(stack, p, tau, max_rank, out_dtype)
        if result is not None:
            return result
        check_finite(stack)  # raises, naming the client with NaN/Inf
        # finite factors whose Gram overflows float64 (entries near 1e154): the SVD route copes
    return _florist_svd(stack, p, tau, max_rank, out_dtype)


# ---------------------------------------------------------------- spectra of a product


def spectrum_of(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Singular values of B @ A (float64, descending, at most min(r, m, n)), by the cheaper exact route."""
    one = ClientStack(B, A, torch.tensor([B.shape[1]]))
    p = torch.ones(1, dtype=torch.float64, device=B.device)
    if exact_route(B.shape[0], A.shape[1], B.shape[1]) == "dense":
        X = dense_update(one, p)
        scale = float(X.abs().max()) if X.numel() else 0.0
        if math.isfinite(scale):
            if scale == 0.0:
                return torch.zeros(0, dtype=torch.float64, device=B.device)
            sigma, _ = _smaller_gram_eigh(X.div_(scale), vectors=False)
            return sigma[: min(B.shape[1], *X.shape)] * scale
    result = _florist_gram(one, p, 1.0, None, torch.float64) or _florist_svd(one, p, 1.0, None, torch.float64)
    return result.singular_values


# ---------------------------------------------------------------- baselines


def weighted_sum_of_factors(stack: ClientStack, p: torch.Tensor, factor: str) -> torch.Tensor:
    """Σ_k p_k B_k zero-padded to r_max columns (factor "B", m×r_max) or Σ_k p_k A_k (factor "A",
    r_max×n), float64: one index_add over the stack's columns (rows), no loop over clients."""
    width = int(stack.ranks.max())
    p_column = stack.per_column(p)
    if factor == "B":
        out = torch.zeros(stack.shape[0], width, dtype=torch.float64, device=stack.B.device)
        return out.index_add_(1, stack.position, _scaled_float64(stack.B, p_column[None, :]))
    out = torch.zeros(width, stack.shape[1], dtype=torch.float64, device=stack.A.device)
    return out.index_add_(0, stack.position, _scaled_float64(stack.A, p_column[:, None]))


def fedit(stack: ClientStack, p: torch.Tensor, out_dtype) -> AggregationResult:
    B, A = weighted_sum_of_factors(stack, p, "B"), weighted_sum_of_factors(stack, p, "A")
    padded = bool((stack.ranks != stack.ranks[0]).any())
    return AggregationResult(
        _out(B, out_dtype), _out(A, out_dtype), B.shape[1], spectrum_of(B, A), 1.0, padded=padded, method="fedit"
    )


def flora(stack: ClientStack, p: torch.Tensor, out_dtype) -> AggregationResult:
    B_s = stack.B.to(torch.float64)
    A_s = _scaled_float64(stack.A, stack.per_column(p)[:, None])
    B = stack.B.to(out_dtype, memory_format=torch.contiguous_format, copy=True)  # never the caller's buffer
    return AggregationResult(
        B, _out(A_s, out_dtype), stack.width, spectrum_of(B_s, A_s), 1.0, method="flora"
    )


def flexlora(stack: ClientStack, p: torch.Tensor, out_dtype) -> AggregationResult:
    # FlexLoRA's defining cost: the dense m×n update and its full SVD, O(mnR + s²l) for any
    # number of clients; ΔW is accumulated block by block, never from R-wide float64 stacks.
    delta = dense_update(stack, p)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    width = min(int(stack.ranks.max()), S.numel())
    root = S[:width].sqrt()
    B = _out(U[:, :width] * root, out_dtype)
    A = _out(root[:, None] * Vh[:width], out_dtype)
    # Splitting √S on both sides makes every client's rank-r_k truncation a prefix.
    return AggregationResult(
        B, A, width, S, retained(S, width), client_ranks=stack.ranks.clamp(max=width), method="flexlora"
    )


def _check_shared_A(stack: ClientStack, shared_A: torch.Tensor) -> None:
    """Every client's A must be the first r_k rows of the shared frozen A (to float32 tolerance)."""
    shared = shared_A.double()
    expected = shared[stack.position]  # R × n: the rows each client should hold
    # tolerance per client: rtol 1e-5, atol 1e-7 · max(1, max |prefix of the shared A|)
    prefix_max = torch.cummax(shared.abs().amax(dim=1), dim=0).values
    atol = 1e-7 * prefix_max[(stack.ranks.to(shared.device) - 1).clamp(min=0)].clamp(min=1.0)
    bad = (stack.A.double() - expected).abs() > stack.per_column(atol)[:, None] + 1e-5 * expected.abs()
    rows = bad.any(dim=1)
    if bool(rows.any()):
        k = int(stack.column_client[rows.nonzero()[0, 0]])
        raise ValueError(
            f"ffa: client {k}'s A is not the first {int(stack.ranks[k])} rows of the shared frozen A; "
            "FFA-LoRA needs every client to keep the common A fixed"
        )


def ffa(stack: ClientStack, p: torch.Tensor, out_dtype) -> AggregationResult:
    widest = int(torch.argmax(stack.ranks))  # the first of the widest clients
    start, width = int(stack.offsets[widest]), int(stack.ranks[widest])
    shared_A = stack.A[start : start + width]
    _check_shared_A(stack, shared_A)
    B = weighted_sum_of_factors(stack, p, "B")
    A = shared_A.to(out_dtype, memory_format=torch.contiguous_format, copy=True)  # never the caller's buffer
    return AggregationResult(_out(B, out_dtype), A, width, spectrum_of(B, shared_A.double()), 1.0, method="ffa")


def fedex(stack: ClientStack, p: torch.Tensor, out_dtype) -> AggregationResult:
    """FedEx-LoRA (arXiv 2410.09432): FedIT's averages B̄ = Σ p_k B_k, Ā = Σ p_k A_k (ranks zero-padded to
    r_max), plus the residual ΔW − B̄Ā that makes the round exact, in low-rank form:

        ΔW − B̄Ā = B_s diag(p) A_s − B̄Ā = [B_s diag(p) | −B̄] [A_s; Ā]     (m × q, q × n; q = R' + r_max)

    with R' = Σ r_k over the clients with p_k > 0 (the others add nothing and are left out). The p-scaled
    B stack is formed once and serves both the average and the residual.
    """
    p_column = stack.per_column(p)
    scaled_B = _scaled_float64(stack.B, p_column[None, :])  # B_s diag(p), m × R
    A_s = stack.A.to(torch.float64)
    width = int(stack.ranks.max())
    B = torch.zeros(stack.shape[0], width, dtype=torch.float64, device=stack.B.device).index_add_(
        1, stack.position, scaled_B)
    A = torch.zeros(width, stack.shape[1], dtype=torch.float64, device=stack.A.device).index_add_(
        0, stack.position, A_s * p_column[:, None])
    live = p_column > 0
    residual = (_out(torch.cat([scaled_B[:, live], -B], dim=1), out_dtype), _out(torch.cat([A_s[live], A]), out_dtype))
    padded = bool((stack.ranks != stack.ranks[0]).any())
    return AggregationResult(_out(B, out_dtype), _out(A, out_dtype), width, spectrum_of(B, A), 1.0, padded=padded,
                             method="fedex", residual=residual)


def update_norms(stack: ClientStack) -> torch.Tensor:
    """‖B_k A_k‖_F per client (float64, K), without forming any m × n product:

        ‖B_k A_k‖_F² = trace(A_kᵀ B_kᵀ B_k A_k) = trace((B_kᵀ B_k)(A_k A_kᵀ)) = Σ_ij (B_kᵀB_k)_ij (A_k A_kᵀ)_ij

    (both r_k × r_k Grams symmetric). Each client's factors are zero-padded to r_max in one K × m × r_max
    batch (K × r_max × n for A), so the K Grams are one batched product each.
    """
    K, (m, n), width = stack.count, stack.shape, int(stack.ranks.max())
    B_batch = torch.zeros(K, width, m, dtype=torch.float64, device=stack.B.device)
    A_batch = torch.zeros(K, width, n, dtype=torch.float64, device=stack.A.device)
    B_batch[stack.column_client, stack.position] = stack.B.T.to(torch.float64)  # row j of B_kᵀ, client k
    A_batch[stack.column_client, stack.position] = stack.A.to(torch.float64)
    gram_B = B_batch @ B_batch.transpose(1, 2)  # K × r_max × r_max: B_kᵀ B_k
    gram_A = A_batch @ A_batch.transpose(1, 2)  # A_k A_kᵀ
    return (gram_B * gram_A).sum(dim=(1, 2)).clamp(min=0.0).sqrt()


def hetlora(stack: ClientStack, p: torch.Tensor, out_dtype) -> AggregationResult:
    """HetLoRA (arXiv 2401.06432): sparsity-weighted aggregation of zero-padded factors.

    The paper weights client k by the Frobenius norm of its update, S_k = ‖B_k A_k‖_F, normalised:
    w_k = S_k / Σ S_j, in place of the sample-count weights (sample counts do not enter: the paper
    replaces data-size weighting by this norm). A client with p_k = 0 (no samples) is left out. Then
    B̄ = Σ w_k pad(B_k) (m × r_max), Ā = Σ w_k pad(A_k) (r_max × n); client k receives the first r_k
    columns of B̄ and rows of Ā (client_ranks = r_k). When every update is zero the norms carry no
    information and the sample weights p are used.
    """
    norms = torch.where(p > 0, update_norms(stack).to(p.device), torch.zeros_like(p))
    total = float(norms.sum())
    weights = norms / total if total > 0 and math.isfinite(total) else p
    B, A = weighted_sum_of_factors(stack, weights, "B"), weighted_sum_of_factors(stack, weights, "A")
    padded = bool((stack.ranks != stack.ranks[0]).any())
    return AggregationResult(
        _out(B, out_dtype), _out(A, out_dtype), B.shape[1], spectrum_of(B, A), 1.0,
        client_ranks=stack.ranks.clamp(max=B.shape[1]), padded=padded, method="hetlora",
    )
