"""SVD maths of the LoRA tools: factor-wise and dense SVD, truncation, the dynamic rank rules of
resize_lora and the 0.99-quantile clamp of svd_merge_lora and extract_lora_from_models
(tools_and_preprocessing.md §2.2-§2.4).

A LoRA delta is a product ``up @ down`` of rank R, so its SVD is computed from the two factors (QR of
each, SVD of the small R×R core) instead of from the full matrix: the same singular values and
vectors, at a cost that grows with R instead of with the layer size. The singular values beyond R
are exactly zero; callers that need the full list pad them. A weight difference of two models has
no such factors: :func:`dense_svd` decomposes it directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MIN_SV = 1e-6  # a module whose largest singular value is at most this is treated as zero
CLAMP_QUANTILE = 0.99
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
_TORCH_QUANTILE_LIMIT = 1 << 24  # torch.quantile refuses larger inputs


@dataclass
class FactorSVD:
    """``up @ down = U · diag(S) · Vh`` with orthonormal columns of U and rows of Vh."""

    U: torch.Tensor  # [out, k]
    S: torch.Tensor  # [k], descending
    Vh: torch.Tensor  # [k, n]

    @property
    def full_length(self) -> int:
        """L = min(out, n): how many singular values the full matrix has."""
        return min(self.U.shape[0], self.Vh.shape[1])

    def padded_singular_values(self) -> list[float]:
        """All L singular values (the ones beyond the factor rank are 0), as Python floats."""
        values = [float(v) for v in self.S.detach().double().cpu()]
        return values + [0.0] * max(0, self.full_length - len(values))


def factor_svd(up: torch.Tensor, down: torch.Tensor) -> FactorSVD:
    """SVD of ``up [out, R] @ down [R, n]`` from the factors (float32 or float64 input)."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.transpose(0, 1))
    core = r_up @ r_down.transpose(0, 1)
    u_core, s, vh_core = torch.linalg.svd(core, full_matrices=False)
    return FactorSVD(q_up @ u_core, s, vh_core @ q_down.transpose(0, 1))


def dense_svd(matrix: torch.Tensor) -> FactorSVD:
    """Thin SVD of a full matrix [out, n] (``torch.linalg.svd``, float32 or float64 input)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return FactorSVD(u, s, vh)


def truncate(svd: FactorSVD, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up [out, rank], down [rank, n])`` = ``(U[:, :rank]·diag(S[:rank]), Vh[:rank])``.

    Asking for more components than the factors have (at most L) adds zero singular values: zero
    columns in ``up`` and rows in ``down`` that complete its orthonormal basis (deterministically).
    """
    have = svd.S.numel()
    if rank <= have:
        return svd.U[:, :rank] * svd.S[:rank], svd.Vh[:rank]
    n = svd.Vh.shape[1]
    if rank > n:
        raise ValueError(f"rank {rank} exceeds the matrix side {n}")
    extra = rank - have
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(n, extra, generator=generator, dtype=torch.float64).to(svd.Vh.device)
    vh = svd.Vh.to(torch.float64)
    for _ in range(2):  # project out the existing rows twice for numerical orthogonality
        basis = basis - vh.transpose(0, 1) @ (vh @ basis)
    completion = torch.linalg.qr(basis).Q.transpose(0, 1).to(svd.Vh.dtype)
    up = torch.cat([svd.U * svd.S, svd.U.new_zeros(svd.U.shape[0], extra)], dim=1)
    return up, torch.cat([svd.Vh, completion], dim=0)


def layer_shaped(up: torch.Tensor, down: torch.Tensor, kernel: tuple[int, int] | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D factors in the stored shapes of a LoRA module: for a conv layer (``kernel`` given) up becomes
    [out, r, 1, 1] and down [r, in, kh, kw]; for a Linear layer (None) they stay as they are."""
    if kernel is None:
        return up, down
    rank = up.shape[1]
    return up.reshape(up.shape[0], rank, 1, 1), down.reshape(rank, -1, *kernel)


# ----------------------------------------------------------------------------------------------
# resize_lora: the rank of one module


def criterion_index(values: list[float], method: str, param: float) -> int:
    """The index i of a dynamic method (before clamping and the +1): see :func:`select_rank`."""
    if method == "sv_ratio":
        threshold = values[0] / param
        return sum(1 for v in values if v > threshold)
    if method == "sv_cumulative":
        parts, target = values, param
    elif method == "sv_fro":
        parts, target = [v * v for v in values], param * param
    else:
        raise ValueError(f"unknown dynamic method {method}")
    total = sum(parts)
    running = 0.0
    for j, v in enumerate(parts):
        running += v
        if running / total >= target:
            return j + 1
    return len(parts) + 1


def select_rank(values: list[float], max_rank: int, method: str | None = None, param: float | None = None) -> int:
    """The new rank q of one module from its L singular values (descending, zeros included).

    * no method: q = ``max_rank``;
    * ``sv_ratio`` t: i = #{j : S_j > S_0/t};
    * ``sv_cumulative`` t: i = 1 + first j with Σ_{≤j} S / Σ S ≥ t;
    * ``sv_fro`` t: i = 1 + first j with Σ_{≤j} S² / Σ S² ≥ t²;
      then i is clamped to [1, L−1], q = i + 1 (one more than the criterion needs, as the reference
      does) and capped at ``max_rank``.

    A zero module (S_0 ≤ 1e-6) gets q = 1. q never exceeds L (the reference fails there).
    """
    length = len(values)
    if values[0] <= MIN_SV:
        return 1
    if method is None:
        q = max_rank
    else:
        i = criterion_index(values, method, float(param))
        i = max(1, min(i, length - 1))
        q = min(i + 1, max_rank)
    return max(1, min(q, length))


def retention(values: list[float], rank: int) -> dict[str, float]:
    """How much of a module the first ``rank`` singular values keep.

    ``sum_retained`` = Σ_{j<q} S / Σ S, ``fro_retained`` = ‖kept‖_F / ‖all‖_F, ``max_ratio`` = S_0 / S_{q−1}
    (NaN for a zero module, inf when S_{q−1} is 0).
    """
    total = sum(values)
    total_sq = sum(v * v for v in values)
    kept = values[:rank]
    last = kept[-1] if kept else 0.0
    return {
        "sum_retained": sum(kept) / total if total > 0 else math.nan,
        "fro_retained": math.sqrt(sum(v * v for v in kept)) / math.sqrt(total_sq) if total_sq > 0 else math.nan,
        "max_ratio": values[0] / last if last > 0 else (math.inf if values[0] > 0 else math.nan),
    }


# ----------------------------------------------------------------------------------------------
# svd_merge_lora / extract_lora_from_models: clamp


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile`` (linear interpolation) that also works above torch's 16M-element limit."""
    flat = values.detach().flatten().float()
    if flat.numel() <= _TORCH_QUANTILE_LIMIT:
        return torch.quantile(flat, q)
    position = q * (flat.numel() - 1)
    lo, hi = math.floor(position), math.ceil(position)
    sorted_values = torch.sort(flat).values
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (position - lo)


def clamp_to_quantile(up: torch.Tensor, down: torch.Tensor, q: float = CLAMP_QUANTILE
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp both factors to [−h, h], h = the ``q``-quantile of their concatenated (signed) entries."""
    h = quantile(torch.cat([up.flatten(), down.flatten()]), q)
    return up.clamp(-h, h), down.clamp(-h, h)
