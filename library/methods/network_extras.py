"""train_network.py's ``--scale_weight_norms`` (max-norm regularisation): the check that the network supports
it and the regulariser applied after every optimizer step. Its registration and up-front checks, and those of
the other later kohya network options, are in library/training/network_options.py; ``--base_weights`` is
merged by :mod:`library.methods.network_base_weights`, ``--fp8_base`` / ``--fp8_base_unet`` applied by
:mod:`library.models.fp8`.

docs/train_network.md ("Base weights, max-norm regularisation, fp8") describes them.
"""

from __future__ import annotations

from typing import Any

from library.errors import UserError


def check_max_norm_support(network: Any, module_name: str, max_norm: float | None) -> None:
    """UserError when ``--scale_weight_norms`` is given for a network without ``apply_max_norm_regularization``
    (or whose ``supports_max_norm_regularization()`` says no: networks.loha, lokr, dylora, oft). kohya warns
    and trains without it; a silently ignored regularisation is refused here."""
    supported = hasattr(network, "apply_max_norm_regularization") and \
        getattr(network, "supports_max_norm_regularization", lambda: True)()
    if max_norm and not supported:
        raise UserError(f"--scale_weight_norms: the network of --network_module {module_name} does not support "
                        "max-norm regularisation (apply_max_norm_regularization; networks.lora does); leave the "
                        "option out")


class MaxNormRegularizer:
    """``--scale_weight_norms``: after every optimizer step the network's modules are scaled back to the
    norm bound, and the step's ``max_norm/keys_scaled``, ``max_norm/max_key_norm`` and
    ``norm/avg_key_norm`` are kept for the logs (kohya's names)."""

    def __init__(self, network: Any, max_norm: float, device: Any):
        """Regularise ``network`` to ``max_norm``; ΔW norms are computed on ``device``."""
        self.network, self.max_norm, self.device = network, max_norm, device
        self.logs: dict[str, float] = {}
        self.mark_unchanged()

    def _version(self) -> int:
        """The sum of the parameters' in-place change counters (an optimizer step raises it)."""
        return sum(p._version for p in self.network.parameters())

    def mark_unchanged(self) -> None:
        """Take the network's current weights as regularised (a fresh or restored network)."""
        self._seen = self._version()

    def apply_if_changed(self) -> dict[str, float]:
        """:meth:`apply` when the weights changed since the last call (an optimizer step happened)."""
        if self._version() != self._seen:
            self.apply()
        return self.logs

    def apply(self) -> dict[str, float]:
        """Scale the modules; return (and keep) the step's log values."""
        scaled, mean_norm, max_norm = self.network.apply_max_norm_regularization(self.max_norm, self.device)
        self.logs = {"max_norm/keys_scaled": float(scaled), "norm/avg_key_norm": float(mean_norm),
                     "max_norm/max_key_norm": float(max_norm)}
        self.mark_unchanged()
        return self.logs
