"""LoHa and LoKr weights: the file format, the ΔW maths and a checked per-module reader.

Shared by the training modules (:mod:`networks.loha`, :mod:`networks.lokr`) and the LoRA tools
(:mod:`networks.lora_files`); OFT modules (``oft_blocks``, :mod:`networks.oft`) are recognised here and
read there. The layout is LyCORIS's, which AUTOMATIC1111's built-in Lora extension
and ComfyUI's LoraLoader read; ``<name>`` is a kohya module name (``lora_unet_…``, ``lora_te_…``).

LoHa (Hadamard product of two low-rank matrices), rank r, layer weight [out, in(, kh, kw)]::

    <name>.hada_w1_a [out, r]   hada_w1_b [r, in·kh·kw]   hada_w2_a [out, r]   hada_w2_b [r, in·kh·kw]
    <name>.alpha                ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha/r

    Tucker form of a k×k convolution: hada_t1, hada_t2 [r, r, kh, kw], hada_w1_a, hada_w2_a [r, out],
    hada_w1_b, hada_w2_b [r, in]; each factor is t ×₁ w_a ×₂ w_b (see :func:`rebuild_tucker`).

LoKr (Kronecker product), out = a·b and in = c·d with a ≤ b and c ≤ d (:func:`factorization`)::

    <name>.lokr_w1 [a, c]          or  lokr_w1_a [a, r] and lokr_w1_b [r, c]
    <name>.lokr_w2 [b, d(, kh, kw)] or  lokr_w2_a [b, r] and lokr_w2_b [r, d·kh·kw]
                                    or  (Tucker) lokr_t2 [r, r, kh, kw], lokr_w2_a [r, b], lokr_w2_b [r, d]
    <name>.alpha                   ΔW = kron(w1, w2) · alpha/r, or · 1 when neither factor is decomposed

A file without an alpha key has scale 1 (as the UIs read it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch

from library.errors import UserError

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
OFT_KEYS = ("oft_blocks",)  # networks/oft.py: its own maths and checked reader
LYCORIS_KEYS = LOHA_KEYS + LOKR_KEYS + OFT_KEYS
# The factor each type starts at zero (so a fresh module changes nothing); all-zero after training = untrained.
ZERO_INIT_KEYS = ("hada_w2_a", "lokr_w2", "lokr_w2_b", "oft_blocks")
KIND_NAMES = {"loha": "LoHa", "lokr": "LoKr", "oft": "OFT"}


# ----------------------------------------------------------------------------------------------
# Maths


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with m·n = dimension and m ≤ n (LyCORIS's rule).

    ``factor`` > 0 that divides ``dimension``: the pair ``(factor, dimension/factor)``, smaller first.
    Otherwise the divisors of ``dimension`` are walked upwards, each at most ``factor`` (no limit for
    -1), stopping at the first one at or past √dimension; the last divisor taken is m. With -1 this is
    the most balanced split: 320 → (16, 20), 768 → (24, 32), 1024 → (32, 32), a prime p → (1, p).
    """
    if dimension < 1:
        raise ValueError(f"cannot factorize {dimension}")
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))  # type: ignore[return-value]
    limit = dimension if factor <= 0 else factor
    m = 1
    for d in range(2, dimension + 1):
        if dimension % d:
            continue
        if d > limit:
            break
        m = d
        if d >= dimension // d:
            break
    return tuple(sorted((m, dimension // m)))  # type: ignore[return-value]


def rebuild_tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """The Tucker product: ``core [r, s, kh, kw]`` times ``wa [r, p]`` on mode 1 and ``wb [s, q]`` on mode 2,
    giving [p, q, kh, kw]."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, wa, wb)


def _product(parts: Mapping[str, torch.Tensor], a: str, b: str, core: str | None) -> torch.Tensor:
    """``parts[a] @ parts[b]``, or the Tucker rebuild when ``core`` is present in ``parts``."""
    if core is not None and parts.get(core) is not None:
        return rebuild_tucker(parts[core], parts[a], parts[b])
    return parts[a].reshape(parts[a].shape[0], -1) @ parts[b].reshape(parts[b].shape[0], -1)


def loha_delta(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Unscaled LoHa ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b): [out, in·kh·kw], or [out, in, kh, kw] in Tucker form."""
    return (_product(parts, "hada_w1_a", "hada_w1_b", "hada_t1")
            * _product(parts, "hada_w2_a", "hada_w2_b", "hada_t2"))


def lokr_factors(parts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w1 [a, c], w2 [b, d(, kh, kw)] or [b, d·kh·kw])`` of a LoKr module, decomposed ones multiplied out."""
    w1 = parts.get("lokr_w1")
    if w1 is None:
        w1 = _product(parts, "lokr_w1_a", "lokr_w1_b", None)
    w2 = parts.get("lokr_w2")
    if w2 is None:
        w2 = _product(parts, "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    return w1, w2


def lokr_delta(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Unscaled LoKr ΔW = kron(w1, w2): [a·b, c·d(, kh, kw)], or [a·b, c·d·kh·kw] for a flat w2."""
    w1, w2 = lokr_factors(parts)
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous())


def module_kind(parts: Mapping[str, object]) -> str | None:
    """``"loha"``, ``"lokr"``, ``"oft"`` or None from the keys of one module (``hada_*`` / ``lokr_*`` /
    ``oft_blocks``)."""
    if "oft_blocks" in parts:
        return "oft"
    if any(k in parts for k in LOHA_KEYS):
        return "loha"
    if any(k in parts for k in LOKR_KEYS):
        return "lokr"
    return None


def lycoris_delta(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Unscaled ΔW of a LoHa or LoKr module (reshape it to the layer's weight shape)."""
    return loha_delta(parts) if module_kind(parts) == "loha" else lokr_delta(parts)


def lycoris_rank(parts: Mapping[str, torch.Tensor]) -> int | None:
    """The rank r that alpha is divided by; None for a LoKr module with two full factors (scale 1)."""
    if module_kind(parts) == "loha":
        return int(parts["hada_w1_b"].shape[0])
    if parts.get("lokr_w1_b") is not None:
        return int(parts["lokr_w1_b"].shape[0])
    if parts.get("lokr_w2_b") is not None:
        return int(parts["lokr_w2_b"].shape[0])
    return None


def lycoris_scale(parts: Mapping[str, torch.Tensor], alpha: torch.Tensor | float | None) -> float:
    """``alpha / r``; 1 without alpha or without a decomposed factor (how AUTOMATIC1111 and ComfyUI read it)."""
    rank = lycoris_rank(parts)
    if alpha is None or rank is None:
        return 1.0
    return float(alpha.detach().float() if isinstance(alpha, torch.Tensor) else alpha) / rank


# ----------------------------------------------------------------------------------------------
# One module of a file


@dataclass
class LycorisModuleWeights:
    """The factors and alpha of one LoHa/LoKr module as stored in a file (the tools' view of it).

    Offers what the LoRA tools use of :class:`networks.lora_files.LoRAModuleWeights` to merge a module
    into a model: ``delta``, ``fits``, ``signature``, ``check_finite``, ``rank``/``alpha_value``/``scale``.
    """

    name: str
    kind: str
    parts: dict[str, torch.Tensor]
    alpha: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        """The rank alpha is divided by (0 for a LoKr module of two full factors)."""
        return lycoris_rank(self.parts) or 0

    @property
    def alpha_value(self) -> float:
        """Alpha as a float (the rank, i.e. scale 1, without an alpha key)."""
        return float(self.alpha.detach().float()) if self.alpha is not None else float(self.rank)

    @property
    def scale(self) -> float:
        """The factor ΔW is multiplied by (:func:`lycoris_scale`)."""
        return lycoris_scale(self.parts, self.alpha)

    @property
    def kernel(self) -> tuple[int, int] | None:
        """Kernel size where the factors tell it (Tucker cores, 4-D ``lokr_w2``); None for flat factors."""
        for key in ("hada_t1", "lokr_t2", "lokr_w2"):
            t = self.parts.get(key)
            if t is not None and t.dim() == 4:
                return int(t.shape[2]), int(t.shape[3])
        return None

    def _shape_flat(self) -> tuple[int, int]:
        """``(out, in·kh·kw)`` of the wrapped layer, from the factor shapes."""
        p = self.parts
        if self.kind == "loha":
            if "hada_t1" in p:
                k = p["hada_t1"].shape[2] * p["hada_t1"].shape[3]
                return int(p["hada_w1_a"].shape[1]), int(p["hada_w1_b"].shape[1] * k)
            return int(p["hada_w1_a"].shape[0]), int(p["hada_w1_b"].shape[1])
        w1_shape = p["lokr_w1"].shape if "lokr_w1" in p else (p["lokr_w1_a"].shape[0], p["lokr_w1_b"].shape[1])
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
            b, d = w2.shape[0], w2[0].numel()
        elif "lokr_t2" in p:
            t2 = p["lokr_t2"]
            b, d = p["lokr_w2_a"].shape[1], p["lokr_w2_b"].shape[1] * t2.shape[2] * t2.shape[3]
        else:
            b, d = p["lokr_w2_a"].shape[0], p["lokr_w2_b"].shape[1]
        return int(w1_shape[0] * b), int(w1_shape[1] * d)

    @property
    def out_features(self) -> int:
        """Output features/channels of the wrapped layer."""
        return self._shape_flat()[0]

    @property
    def in_features(self) -> int:
        """Input features/channels (in·kh·kw where flat factors do not tell the kernel)."""
        kernel = self.kernel or (1, 1)
        return self._shape_flat()[1] // (kernel[0] * kernel[1])

    def signature(self) -> tuple[int, int, tuple[int, int]]:
        """(out, in, kernel) as far as the factors tell it (kernel (1, 1) when they do not)."""
        return self.out_features, self.in_features, self.kernel or (1, 1)

    def fits(self, layer_signature: tuple[int, int, tuple[int, int]]) -> bool:
        """Whether ΔW has the size of a layer of this (out, in, kernel)."""
        out, inp, kernel = layer_signature
        if self.kernel is not None and self.kernel != tuple(kernel):
            return False
        return self._shape_flat() == (out, inp * kernel[0] * kernel[1])

    def check_finite(self, source: str | os.PathLike) -> None:
        """UserError when a factor holds NaN/inf (a diverged training run)."""
        if not all(bool(torch.isfinite(t).all()) for t in self.parts.values()):
            raise UserError(f"{source}: {KIND_NAMES[self.kind]} module {self.name} contains NaN or infinite "
                            "weights (training diverged?); check the file with networks/check_lora_weights.py")

    @property
    def is_dora(self) -> bool:
        """Never: ΔW does not depend on the layer's weight."""
        return False

    def delta(self, multiplier: float = 1.0, dtype: torch.dtype | None = None,
              base: torch.Tensor | None = None) -> torch.Tensor:
        """``multiplier · scale · ΔW`` in float32 (factors first rounded to ``dtype`` when given); reshape it
        to the layer's weight shape. ``base`` (the layer weight) is not needed."""
        parts = {k: (v.to(dtype) if dtype is not None else v).float() for k, v in self.parts.items()}
        return lycoris_delta(parts) * (multiplier * self.scale)


def _expect(cond: bool, name: str, kind: str, parts: Mapping[str, torch.Tensor], where: str) -> None:
    if not cond:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(parts.items()))
        raise UserError(f"{where}: {KIND_NAMES[kind]} module {name} has inconsistent weights: {shapes} "
                        "(see docs/train_network.md for the LoHa/LoKr layout)")


def _check_pair(p: Mapping[str, torch.Tensor], a: str, b: str, core: str | None) -> bool:
    """``a``/``b`` form a product: 2-D ``a [m, r]`` and ``b [r, n]``, or with a Tucker core [r, s, k, k]
    ``a [r, m]`` and ``b [s, n]``."""
    if a not in p or b not in p or p[a].dim() != 2 or p[b].dim() != 2:
        return False
    if core is not None and core in p:
        t = p[core]
        return t.dim() == 4 and p[a].shape[0] == t.shape[0] and p[b].shape[0] == t.shape[1]
    return p[a].shape[1] == p[b].shape[0] and p[a].shape[1] > 0


def _product_shape(p: Mapping[str, torch.Tensor], i: str) -> tuple[int, ...]:
    """The shape of LoHa factor ``i`` ("1" or "2") without computing it."""
    a, b, t = p[f"hada_w{i}_a"], p[f"hada_w{i}_b"], p.get(f"hada_t{i}")
    if t is not None:
        return (a.shape[1], b.shape[1], *t.shape[2:])
    return (a.shape[0], b.shape[1])


def lycoris_module_weights(name: str, tensors: Mapping[str, torch.Tensor], where: str) -> LycorisModuleWeights:
    """The checked weights of one LoHa/LoKr module from its tensors (keys after ``<name>.``: the
    ``hada_*``/``lokr_*`` factors and optionally ``alpha``).

    UserError naming ``where`` (option and file) and the module for missing factors, shapes that do not
    multiply out, and keys of another type (``lora_down``, a LyCORIS DoRA ``dora_scale``). An OFT module
    (``oft_blocks``) is read by :func:`networks.oft.oft_module_weights` instead.
    """
    kind = module_kind(tensors)
    if kind == "oft":
        from networks.oft import oft_module_weights

        return oft_module_weights(name, tensors, where)  # type: ignore[return-value]
    p = {k: v for k, v in tensors.items() if k in LYCORIS_KEYS}
    others = sorted(set(tensors) - set(p) - {"alpha"})
    if others:
        raise UserError(f"{where}: {KIND_NAMES[kind]} module {name} also has '{others[0]}' (LyCORIS DoRA and mixed "
                        "modules are not supported)")
    if kind == "loha":
        ok = (("hada_t1" in p) == ("hada_t2" in p) and not any(k in p for k in LOKR_KEYS)
              and _check_pair(p, "hada_w1_a", "hada_w1_b", "hada_t1")
              and _check_pair(p, "hada_w2_a", "hada_w2_b", "hada_t2")
              and _product_shape(p, "1") == _product_shape(p, "2"))
        _expect(ok, name, kind, p, where)
    else:
        w1_ok = ("lokr_w1" in p and p["lokr_w1"].dim() == 2) or _check_pair(p, "lokr_w1_a", "lokr_w1_b", None)
        w2_ok = ("lokr_w2" in p and p["lokr_w2"].dim() in (2, 4)) or _check_pair(p, "lokr_w2_a", "lokr_w2_b",
                                                                               "lokr_t2")
        _expect(w1_ok and w2_ok, name, kind, p, where)
    return LycorisModuleWeights(name, kind, p, tensors.get("alpha"))
