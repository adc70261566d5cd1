"""The low-rank math of aggregating client LoRA factors: FLoRIST and the baselines.

Pure math on torch tensors: no MPI, no DeepSpeed, no I/O. The methods
(florist_mpi.methods) call these kernels; `florist_mpi.aggregation.aggregate(method,
[(B_k, A_k), ...], n_k, tau=...)` is the entry point by name. Every client k supplies its
effective update ΔW_k = B_k @ A_k (LoRA scaling already folded into B_k), B_k of
shape m×r_k and A_k of shape r_k×n; `weights` are sample counts n_k.

FLoRIST (arXiv 2506.09199) never forms the m×n update. With the stacks
B_s = [B_1 … B_K] and A_s = [p_1 A_1; …; p_K A_K] (R = Σ r_k), ΔW = B_s A_s, and the
global adapter is ΔW's SVD truncated to the smallest rank holding τ of its energy.
The default route ("gram") gets it from two float64 Gram matrices of the stacks (one
BLAS-3 pass over each), a Cholesky factor and one R×R eigenproblem, truncates to r_g,
and only then multiplies the stacks by R×r_g matrices; about 2× fewer flops and far
less LAPACK time than the paper's three thin SVDs, which are kept as `route="svd"`,
the reference. Both routes first rescale each client to ‖B_k‖ = ‖p_k A_k‖ (which leaves
ΔW unchanged) and drop clients that contribute nothing.

Accuracy: the Gram route resolves singular values down to about 1e-8 of the largest
(float64 squared); smaller ones carry less than 1e-16 of the energy. Stacks too
ill-conditioned for a Cholesky factor take an exact SVD basis instead.

The Gram route costs about 2(m+n)R² flops plus an R×R eigensolver, so it grows like R³
once many clients take part, and when R reaches min(m, n) the stack can no longer have
a Cholesky factor (it is rank-deficient) and the exact SVD basis of an m×R stack takes
over: a cliff. The "dense" route is bounded for any R: it forms ΔW (m×n, float64) once,
client block by client block, takes the eigendecomposition of its smaller Gram matrix
(min(m, n) square), truncates, and projects ΔW on the kept singular vectors. "auto"
picks, per module, whichever of the two a flop model (`route_costs`) says is cheaper;
its eigensolver weight was measured (README, "Aggregation at many clients").
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

ROUTES = ("auto", "gram", "dense", "svd")
# Relative energy below which the tail of a spectrum counts as numerical zero. Its
# Frobenius contribution is at most 1e-6 of ‖ΔW‖, far below float32 resolution of ΔW.
ZERO_ENERGY = 1e-12
# A stack direction whose singular value is below this fraction of the largest is
# treated as absent (Gram eigenvalues in float64 resolve about 1e-8 in σ).
STACK_RTOL = 1e-7
# Cost of a float64 s×s symmetric eigendecomposition (values and vectors) in units of
# s³ GEMM flops: torch.linalg.eigh at s = 2048…4096 took 11–15× the time of s³ flops of
# float64 GEMM on the development machine (benchmarks/aggregation_routes.py).
EIGH_FLOPS_PER_CUBE = 13.0
# The Gram route's small dense work (Cholesky, triangular inverse, the core C_B G_A C_Bᵀ):
# about 5 R³ flops.
GRAM_CORE_FLOPS_PER_CUBE = 5.0
# Clients per block when ΔW is accumulated (bounds the float64 copies to a block).
DENSE_BLOCK_COLUMNS = 512
# Measured limit of the Gram route: once R passes this fraction of min(m, n), the m×R stack
# of trained-like clients (decaying column scales) is too ill-conditioned for a Cholesky
# factor and the Gram route pays an m×R SVD: at 4096×4096 with rank-16 clients it took
# 50 s at R = 3072 and 283 s at R = 3584, against 59–73 s for the dense route
# (benchmarks/aggregation_routes.py, README "Aggregation at many clients").
GRAM_MAX_FILL = 0.8

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class AggregationResult:
    B: torch.Tensor  # m × r_g global factor, ΔW_global ≈ B @ A
    A: torch.Tensor  # r_g × n
    rank: int
    singular_values: torch.Tensor  # spectrum the rank was chosen from (float64)
    energy: float  # retained fraction Σ_{i≤r_g} σ_i² / Σ σ_i²
    client_factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # flexlora: one pair per client
    padded: bool = False  # fedit: heterogeneous ranks were zero-padded to the largest
    method: str = ""


# ------------------------------------------------------------------------ checks


def normalised_weights(weights, count: int) -> list[float]:
    """p_k = n_k / Σ n as Python floats (a handful of numbers: no tensor round trips)."""
    values = weights.tolist() if isinstance(weights, torch.Tensor) else weights
    try:
        w = [float(x) for x in (values if isinstance(values, (list, tuple)) else list(values))]
    except (TypeError, ValueError):
        raise ValueError("weights must be a sequence of numbers (sample counts), one per client") from None
    if len(w) != count:
        raise ValueError(f"got {len(w)} weights for {count} clients: give one weight (sample count) per client")
    if not all(math.isfinite(x) and x >= 0 for x in w):
        raise ValueError("weights must be finite and non-negative sample counts")
    total = math.fsum(w)
    if total <= 0:
        raise ValueError("the total weight is zero: at least one client needs a positive sample count")
    return [x / total for x in w]


def check_factors(factors: Factors, finite: bool = True) -> tuple[int, int]:
    if not factors:
        raise ValueError("no client factors given: pass a non-empty list of (B, A) pairs")
    m = n = None
    for k, pair in enumerate(factors):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"client {k}: expected a (B, A) pair")
        B, A = pair
        if B.dim() != 2 or A.dim() != 2:
            raise ValueError(f"client {k}: B and A must be 2-D matrices (got {B.dim()}-D and {A.dim()}-D)")
        if B.shape[1] != A.shape[0]:
            raise ValueError(
                f"client {k}: B is {tuple(B.shape)} but A is {tuple(A.shape)}; "
                "B's columns must equal A's rows (the rank)"
            )
        if m is None:
            m, n = B.shape[0], A.shape[1]
        elif (B.shape[0], A.shape[1]) != (m, n):
            raise ValueError(
                f"client {k}: update is {B.shape[0]}×{A.shape[1]} but client 0's is {m}×{n}; "
                "all clients must adapt the same module"
            )
        if finite and not (torch.isfinite(B).all() and torch.isfinite(A).all()):
            raise ValueError(f"client {k}: factors contain NaN or Inf; exclude that client before aggregating")
    return m, n


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


# ------------------------------------------------------------------- routes


def route_costs(m: int, n: int, R: int) -> dict[str, float]:
    """Estimated work (GEMM-flop equivalents) of FLoRIST's exact routes for one m×n module.

    gram:  two Grams of the stacks, 2(m+n)R², then R×R Cholesky, core and eigensolver.
    dense: ΔW = B_s A_s, 2mnR; its smaller Gram, 2s²l (s = min(m, n), l = max(m, n));
           an s×s eigensolver.
    From R = GRAM_MAX_FILL · s on, the stack loses its Cholesky factor (rank-deficient
    past R = s, too ill-conditioned before) and the Gram route needs an m×R SVD: it is
    never chosen there (cost inf).
    """
    small, large = min(m, n), max(m, n)
    gram = 2.0 * (m + n) * R * R + (EIGH_FLOPS_PER_CUBE + GRAM_CORE_FLOPS_PER_CUBE) * float(R) ** 3
    dense = 2.0 * m * n * R + 2.0 * small * small * large + EIGH_FLOPS_PER_CUBE * float(small) ** 3
    return {"gram": gram if R < GRAM_MAX_FILL * small else math.inf, "dense": dense}


def exact_route(m: int, n: int, R: int) -> str:
    """The cheaper exact route ("gram" or "dense") for an m×n module with stack width R."""
    costs = route_costs(m, n, R)
    return "dense" if costs["dense"] < costs["gram"] else "gram"


# ------------------------------------------------------------------- stacking


def _stacks(factors: Factors, p: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """B_s (m×R) and A_s (R×n) in float64, with p_k folded into A_k."""
    B_s = torch.cat([B.double() for B, _ in factors], dim=1)
    A_s = torch.cat([p[k] * A.double() for k, (_, A) in enumerate(factors)], dim=0)
    return B_s, A_s


def padded_columns(X: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(X, (0, width - X.shape[1]))


def _padded_rows(X: torch.Tensor, height: int) -> torch.Tensor:
    return torch.nn.functional.pad(X, (0, 0, 0, height - X.shape[0]))


def _stacked_float64(blocks: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The blocks concatenated along `dim` in float64, converted while copying once."""
    shape = list(blocks[0].shape)
    shape[dim] = sum(block.shape[dim] for block in blocks)
    out = torch.empty(shape, dtype=torch.float64, device=blocks[0].device)
    offset = 0
    for block in blocks:  # copy_ converts on the fly: one pass instead of cat, then convert
        out.narrow(dim, offset, block.shape[dim]).copy_(block)
        offset += block.shape[dim]
    return out


def _client_scales(norm_B: list[float], norm_A: list[float], p: list[float]) -> tuple[list[float], list[float]]:
    """Per-client scales (c_k, p_k / c_k) that give c_k B_k and (p_k / c_k) A_k equal norms.

    ΔW = Σ (c_k B_k)(p_k A_k / c_k) for any c_k > 0, so the sum is unchanged. Balancing makes
    each stack's numerical-rank cut independent of how a client split ΔW_k between B_k and
    A_k. A client with p_k = 0 or a zero factor adds nothing and gets scale 0 (to be dropped).
    """
    c, d = [], []
    for b, a, weight in zip(norm_B, norm_A, p):
        scale = math.sqrt(weight * a) / math.sqrt(b) if b > 0 and weight * a > 0 else 0.0
        c.append(scale)
        d.append(weight / scale if scale else 0.0)
    return c, d


def _per_column(values: list[float], widths: list[int], like: torch.Tensor) -> torch.Tensor:
    columns = [value for value, width in zip(values, widths) for _ in range(width)]
    return torch.tensor(columns, dtype=torch.float64, device=like.device)


def _segment_norms(squares: list[float], widths: list[int]) -> list[float]:
    """Per-client Frobenius norms from the per-column squared norms (a Gram's diagonal)."""
    bounds = [0]
    for width in widths:
        bounds.append(bounds[-1] + width)
    return [math.sqrt(max(0.0, sum(squares[lo:hi]))) for lo, hi in zip(bounds, bounds[1:])]


# ------------------------------------------------------- FLoRIST's small core

# A Cholesky factor is used only while the stack's condition number (Frobenius estimate)
# stays below this: the Gram route's basis loses orthogonality like eps · cond², so this
# keeps singular values accurate to ~1e-6 relative. Worse stacks take the SVD path.
CHOLESKY_MAX_COND = 1e5


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


def _florist_gram(factors: Factors, p: list[float], tau, max_rank, out_dtype) -> AggregationResult | None:
    """FLoRIST through float64 Gram matrices; None if they overflow (the caller falls back).

    With B_s = Q_B C_B (C_B from the Cholesky factor of B_sᵀB_s) and M = C_B A_s,
    ΔW = Q_B M, so ΔW's left singular vectors are Q_B U and its singular values σ
    come from the R×R eigenproblem M Mᵀ = C_B (A_s A_sᵀ) C_Bᵀ = U diag(σ²) Uᵀ.
    Truncated to r_g first, the outputs are two thin products over the stacks:
        B_g = Q_B U_r diag(σ_r) = B_s (C_B⁻¹ U_r diag(σ_r)),   A_g = diag(σ_r)⁻¹ U_rᵀ C_B A_s,
    which is the same rank-r_g truncated SVD of ΔW that FLoRIST's three SVDs give.
    """
    widths = [B.shape[1] for B, _ in factors]
    B_s = _stacked_float64([B for B, _ in factors], 1)
    A_s = _stacked_float64([A for _, A in factors], 0)
    G_B, G_A = B_s.T @ B_s, A_s @ A_s.T
    squares_B, squares_A = G_B.diagonal().tolist(), G_A.diagonal().tolist()
    # |G_ij| ≤ √(G_ii G_jj): finite diagonals mean finite Grams (NaN/Inf inputs show up here).
    if not all(map(math.isfinite, squares_B + squares_A)):
        return None
    c, d = _client_scales(_segment_norms(squares_B, widths), _segment_norms(squares_A, widths), p)
    if not all(c):  # rare: drop the clients that add nothing, then start again without them
        live = [k for k, scale in enumerate(c) if scale]
        if not live:
            return _zero_result(B_s.shape[0], A_s.shape[1], B_s, out_dtype, "florist")
        return _florist_gram([factors[k] for k in live], [p[k] for k in live], tau, max_rank, out_dtype)
    w_B, w_A = _per_column(c, widths, B_s), _per_column(d, widths, B_s)
    G_B.mul_(w_B[:, None] * w_B[None, :])
    G_A.mul_(w_A[:, None] * w_A[None, :])
    cholesky = _cholesky_factor(G_B)
    if cholesky is None:  # ill-conditioned or rank-deficient B stack: an exact orthonormal basis
        Q_B, C_B = _svd_basis(B_s * w_B)
    else:
        C_B, C_B_inv = cholesky
    U_r, sigma, rank = _spectral_core(C_B @ G_A @ C_B.T, tau, max_rank)
    if rank == 0:
        return _zero_result(B_s.shape[0], A_s.shape[1], B_s, out_dtype, "florist", sigma)
    sigma_r = sigma[:rank]
    if cholesky is None:
        B_g = Q_B @ (U_r * sigma_r)
    else:
        B_g = B_s @ (w_B[:, None] * (C_B_inv @ (U_r * sigma_r)))
    A_g = (((U_r / sigma_r).T @ C_B) * w_A) @ A_s
    return AggregationResult(
        B_g.to(out_dtype), A_g.to(out_dtype), rank, sigma, retained(sigma, rank), method="florist"
    )


def _truncated_core(core: torch.Tensor, tau: float, max_rank):
    """SVD of the small core cut to the energy rank: (U_r·S_r, Vh_r, full spectrum, rank)."""
    if core.numel() == 0:
        return None, None, torch.zeros(0, dtype=torch.float64, device=core.device), 0
    U_P, S_P, Vh_P = torch.linalg.svd(core, full_matrices=False)
    rank = select_rank(S_P, tau, max_rank)
    return U_P[:, :rank] * S_P[:rank], Vh_P[:rank], S_P, rank


def _norm(X: torch.Tensor) -> float:
    """Frobenius norm without overflow for entries beyond √(float64 max)."""
    largest = float(X.abs().max()) if X.numel() else 0.0
    return largest * float((X / largest).norm()) if largest > 0 else 0.0


def _balanced_stacks(factors: Factors, p: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 stacks of the clients that add something, each balanced (see _client_scales)."""
    pairs = [(B.double(), A.double()) for B, A in factors]
    c, d = _client_scales([_norm(B) for B, _ in pairs], [_norm(A) for _, A in pairs], p)
    live = [k for k, scale in enumerate(c) if scale]
    if not live:
        B, A = pairs[0]
        return B.new_zeros(B.shape[0], 0), A.new_zeros(0, A.shape[1])
    return torch.cat([c[k] * pairs[k][0] for k in live], dim=1), torch.cat([d[k] * pairs[k][1] for k in live], dim=0)


def _florist_svd(factors: Factors, p: list[float], tau, max_rank, out_dtype) -> AggregationResult:
    """Reference: the paper's three thin SVDs (stacks, then core), truncated before forming."""
    B_s, A_s = _balanced_stacks(factors, p)
    m, n = B_s.shape[0], A_s.shape[1]
    if B_s.shape[1] == 0:
        return _zero_result(m, n, B_s, out_dtype, "florist")
    U_B, C_B = _svd_basis(B_s)  # C_B = S_B V_Bᵀ
    V_A, C_A = _svd_basis(A_s.T)  # A_s = C_Aᵀ V_Aᵀ with C_Aᵀ = U_A S_A
    left, right, spectrum, rank = _truncated_core(C_B @ C_A.T, tau, max_rank)
    if rank == 0:
        return _zero_result(m, n, B_s, out_dtype, "florist", spectrum)
    return AggregationResult(
        (U_B @ left).to(out_dtype),
        (right @ V_A.T).to(out_dtype),
        rank,
        spectrum,
        retained(spectrum, rank),
        method="florist",
    )


# ------------------------------------------------------- FLoRIST's dense route


def dense_update(factors: Factors, p: list[float]) -> torch.Tensor:
    """ΔW = Σ_k p_k B_k A_k (m×n, float64), one GEMM per block of clients.

    Blocks of about DENSE_BLOCK_COLUMNS stack columns keep each GEMM wide while the float64
    copies stay a block's, not the R-wide stacks'. Zero-weight clients are skipped.
    """
    m, n = factors[0][0].shape[0], factors[0][1].shape[1]
    delta = torch.zeros(m, n, dtype=torch.float64, device=factors[0][0].device)
    block: list[int] = []

    def flush() -> None:
        if not block:
            return
        widths = [factors[k][0].shape[1] for k in block]
        B_block = _stacked_float64([factors[k][0] for k in block], 1)  # m × w
        A_block = _stacked_float64([factors[k][1] for k in block], 0)  # w × n
        A_block.mul_(_per_column([p[k] for k in block], widths, A_block)[:, None])
        delta.addmm_(B_block, A_block)
        block.clear()

    for k in range(len(factors)):
        if p[k] > 0:
            block.append(k)
            if sum(factors[j][0].shape[1] for j in block) >= DENSE_BLOCK_COLUMNS:
                flush()
    flush()
    return delta


def _smaller_gram_eigh(X: torch.Tensor, vectors: bool = True):
    """Eigen-decomposition of X Xᵀ (m ≤ n) or Xᵀ X (m > n): (σ descending, vectors or None)."""
    G = X @ X.T if X.shape[0] <= X.shape[1] else X.T @ X  # s × s, s = min(m, n)
    if not vectors:
        return torch.linalg.eigvalsh(G).flip(-1).clamp(min=0.0).sqrt(), None
    eigenvalues, V = torch.linalg.eigh(G)  # ascending
    return eigenvalues.flip(-1).clamp(min=0.0).sqrt(), V


def _florist_dense(factors: Factors, p: list[float], tau, max_rank, out_dtype) -> AggregationResult:
    """FLoRIST through ΔW: its truncated SVD from the eigenvectors of its smaller Gram.

    With X = ΔW / max|ΔW| (so that the Gram cannot overflow) and m ≤ n, X Xᵀ = U diag(σ²) Uᵀ
    gives B_g = U_r diag(σ_r) and A_g = diag(σ_r)⁻¹ U_rᵀ X = V_rᵀ (for m > n the roles swap:
    A_g = V_rᵀ, B_g = X V_r). Either way B_g A_g is ΔW projected on the kept singular
    vectors, the same rank-r_g truncated SVD as the Gram route, in the same B = UΣ, A = Vᵀ
    split. The spectrum is cut at min(R, m, n), ΔW's largest possible rank, as the Gram
    route's is.
    """
    check_factors(factors)  # one cheap pass; names a client with NaN/Inf
    m, n = factors[0][0].shape[0], factors[0][1].shape[1]
    live = [k for k, (B, A) in enumerate(factors) if p[k] > 0 and bool(B.any()) and bool(A.any())]
    like = factors[0][0]
    if not live:
        return _zero_result(m, n, like, out_dtype, "florist")
    X = dense_update([factors[k] for k in live], [p[k] for k in live])
    if not bool(torch.isfinite(X).all()):  # finite factors whose product overflows float64
        return _florist_svd(factors, p, tau, max_rank, out_dtype)
    scale = float(X.abs().max())
    if scale == 0.0:
        return _zero_result(m, n, like, out_dtype, "florist")
    X.div_(scale)
    sigma, V = _smaller_gram_eigh(X)
    sigma = sigma[: min(sum(factors[k][0].shape[1] for k in live), m, n)]
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
        B_g, A_g = (X @ V_r) * scale, V_r.T
    return AggregationResult(
        B_g.to(out_dtype), A_g.contiguous().to(out_dtype), rank, spectrum, retained(spectrum, rank), method="florist"
    )


def _dense_spectrum(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor | None:
    """Singular values of B @ A (at most min(r, m, n) of them) through the dense product."""
    X = B.double() @ A.double()
    if not bool(torch.isfinite(X).all()):
        return None
    scale = float(X.abs().max()) if X.numel() else 0.0
    if scale == 0.0:
        return torch.zeros(0, dtype=torch.float64, device=X.device)
    sigma, _ = _smaller_gram_eigh(X.div_(scale), vectors=False)
    return sigma[: min(B.shape[1], *X.shape)] * scale


def florist(factors: Factors, p: list[float], tau: float, max_rank, route: str, out_dtype) -> AggregationResult:
    if route == "auto":
        width = sum(B.shape[1] for k, (B, _) in enumerate(factors) if p[k] > 0)
        route = exact_route(factors[0][0].shape[0], factors[0][1].shape[1], width)
    if route == "dense":
        return _florist_dense(factors, p, tau, max_rank, out_dtype)
    if route == "gram":
        result = _florist_gram(factors, p, tau, max_rank, out_dtype)
        if result is not None:
            return result
        check_factors(factors)  # raises, naming the client with NaN/Inf
        # finite factors whose Gram overflows float64 (entries near 1e154): the SVD route copes
    return _florist_svd(factors, p, tau, max_rank, out_dtype)


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


def spectrum_of(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Singular values of B @ A: the small-core trick, or the dense product where cheaper."""
    if exact_route(B.shape[0], A.shape[1], B.shape[1]) == "dense":
        spectrum = _dense_spectrum(B, A)
        if spectrum is not None:
            return spectrum
    result = _florist_gram([(B, A)], [1.0], 1.0, None, torch.float64) or _florist_svd(
        [(B, A)], [1.0], 1.0, None, torch.float64
    )
    return result.singular_values


# ---------------------------------------------------------------- baselines


def fedit(factors: Factors, p: list[float], out_dtype) -> AggregationResult:
    width = max(B.shape[1] for B, _ in factors)
    B = sum(p[k] * padded_columns(Bk.double(), width) for k, (Bk, _) in enumerate(factors))
    A = sum(p[k] * _padded_rows(Ak.double(), width) for k, (_, Ak) in enumerate(factors))
    padded = len({Bk.shape[1] for Bk, _ in factors}) > 1
    return AggregationResult(
        B.to(out_dtype), A.to(out_dtype), width, spectrum_of(B, A), 1.0, padded=padded, method="fedit"
    )


def flora(factors: Factors, p: list[float], out_dtype) -> AggregationResult:
    B_s, A_s = _stacks(factors, p)
    return AggregationResult(
        B_s.to(out_dtype), A_s.to(out_dtype), B_s.shape[1], spectrum_of(B_s, A_s), 1.0, method="flora"
    )


def flexlora(factors: Factors, p: list[float], out_dtype) -> AggregationResult:
    # FlexLoRA's defining cost: the dense m×n update and its full SVD, O(mnR + s²l) for any
    # number of clients; ΔW is accumulated block by block, never from the R-wide stacks.
    delta = dense_update(factors, p)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    width = min(max(B.shape[1] for B, _ in factors), S.numel())
    root = S[:width].sqrt()
    B = (U[:, :width] * root).to(out_dtype)
    A = (root[:, None] * Vh[:width]).to(out_dtype)
    # Splitting √S on both sides makes every client's rank-r_k truncation a prefix.
    clients = [(B[:, : min(Bk.shape[1], width)], A[: min(Bk.shape[1], width)]) for Bk, _ in factors]
    return AggregationResult(B, A, width, S, retained(S, width), client_factors=clients, method="flexlora")


def ffa(factors: Factors, p: list[float], out_dtype) -> AggregationResult:
    widest = max(range(len(factors)), key=lambda k: factors[k][0].shape[1])
    shared_A = factors[widest][1]
    for k, (Bk, Ak) in enumerate(factors):
        prefix = shared_A[: Ak.shape[0]]
        if not torch.allclose(Ak.double(), prefix.double(), rtol=1e-5, atol=1e-7 * max(1.0, float(prefix.abs().max()))):
            raise ValueError(
                f"ffa: client {k}'s A is not the first {Ak.shape[0]} rows of the shared frozen A; "
                "FFA-LoRA needs every client to keep the common A fixed"
            )
    width = shared_A.shape[0]
    B = sum(p[k] * padded_columns(Bk.double(), width) for k, (Bk, _) in enumerate(factors))
    A = shared_A.double()
    return AggregationResult(B.to(out_dtype), A.to(out_dtype), width, spectrum_of(B, A), 1.0, method="ffa")
