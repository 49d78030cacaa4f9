"""LoRA-family network training: the UNet and text encoder stay frozen; a ``networks/`` module trains."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Callable

import torch

from library.data.tokens import encode_tokens, encode_weighted_tokens, apply_token_weights
from library.errors import UserError
from library.methods.base import MethodBase
from library.output_safety import OutputLayout

logger = logging.getLogger(__name__)

SAVE_EXTENSIONS = {"safetensors": ".safetensors", "ckpt": ".ckpt", "pt": ".pt"}


def import_network_module(name: str | None) -> Any:
    """Import ``--network_module`` (e.g. ``networks.lora``); it must provide ``create_network``."""
    if not name:
        raise UserError("--network_module is required (e.g. networks.lora or networks.dylora)")
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise UserError(f"--network_module {name}: cannot import it ({exc})") from None
    if not hasattr(module, "create_network"):
        raise UserError(f"--network_module {name}: the module has no create_network()")
    return module


def network_text_encoder(module_name: str | None, text_encoder: Any) -> Any:
    """The text encoder as a third-party ``--network_module`` (e.g. ``lycoris.kohya``) gets it: transformers
    5 dropped the ``text_model.`` level of CLIP's module paths, so such modules would name their modules
    ``lora_te_encoder_…``; a wrapper holding the model as ``text_model`` gives them kohya's
    ``lora_te_text_model_encoder_…`` names. Our own ``networks.*`` modules add the level themselves."""
    if (text_encoder is None or str(module_name or "").startswith("networks.")
            or hasattr(text_encoder, "text_model")):
        return text_encoder
    view = torch.nn.Module()
    view.text_model = text_encoder
    return view


def output_layout(save_model_as: str) -> OutputLayout:
    """``<name>.safetensors`` / ``.ckpt`` / ``.pt`` network files."""
    return OutputLayout("network", SAVE_EXTENSIONS[save_model_as])


class NetworkMethod(MethodBase):
    """Train a network (LoRA, DyLoRA, ...) applied to a frozen model."""

    name = "network"

    def __init__(self, *, model: Any, network: Any, train_unet: bool, train_text_encoder: bool,
                 text_encoder_lr: float | None, unet_lr: float | None, learning_rate: float,
                 clip_skip: int | None, max_token_length: int | None, weighted_captions: bool,
                 save_format: str, save_dtype: torch.dtype | None, device: torch.device,
                 metadata: Callable[[int, int, bool], dict[str, str]], max_norm: float | None = None):
        """``metadata(epoch, step, final)`` returns the ``ss_*`` header for a save; ``max_norm``
        (``--scale_weight_norms``) regularises the network after every optimizer step."""
        from library.methods.network_extras import MaxNormRegularizer

        self.model, self.network = model, network
        self.max_norm = MaxNormRegularizer(network, max_norm, device) if max_norm else None
        self.train_unet, self.train_text_encoder = train_unet, train_text_encoder
        self.text_encoder_in_optimizer = self.text_encoder_training = train_text_encoder
        self.clip_skip, self.max_token_length = clip_skip, max_token_length
        self.weighted_captions = weighted_captions
        self.save_format, self.save_dtype = save_format, save_dtype
        self.device = device
        self.metadata = metadata
        groups = network.prepare_optimizer_params(text_encoder_lr, unet_lr, learning_rate)
        descriptions = None
        if isinstance(groups, tuple):  # the newer kohya/LyCORIS form: (param groups, lr descriptions)
            groups, descriptions = groups
        self.groups = groups if isinstance(groups[0], dict) else [{"params": list(groups)}]
        self._group_names = self._name_groups()
        if descriptions and len(descriptions) == len(self.groups):
            self._group_names = [f"lr/{d}" for d in descriptions]

    def _name_groups(self) -> list[str]:
        if len(self.groups) == 1:
            return ["lr/textencoder" if self.train_text_encoder and not self.train_unet else "lr/unet"]
        names = []
        for i, _ in enumerate(self.groups):
            if i == 0 and self.train_text_encoder:
                names.append("lr/textencoder")
            elif len(self.groups) == 2 and self.train_text_encoder:
                names.append("lr/unet")
            else:
                names.append(f"lr/group{i}")
        return names

    def param_groups(self) -> list[dict[str, Any]]:
        """The network's parameter groups (text encoder, UNet or per-block)."""
        return self.groups

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The network's weights."""
        return self.network.state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the network's weights exactly."""
        self.network.load_state_dict(state, strict=True)
        if self.max_norm is not None:
            self.max_norm.mark_unchanged()

    def after_step(self, global_step: int) -> None:
        """``--scale_weight_norms``: max-norm regularisation of the network once the optimizer changed it
        (the calls of ``--resume`` / ``--initial_step`` before the first step change nothing)."""
        if self.max_norm is not None:
            self.max_norm.apply_if_changed()

    def set_train(self, training: bool) -> None:
        """Network modules train (dropout active); the base model stays in eval mode."""
        self.network.train(training)

    def on_epoch_start(self, epoch: int) -> None:
        """Forward to the network's hook."""
        hook = getattr(self.network, "on_epoch_start", None)
        if hook is not None:
            hook(self.model.text_encoder, self.model.unet)

    def conditioning(self, batch: dict[str, Any]) -> torch.Tensor:
        """Text-encoder output; gradients only when text-encoder modules train."""
        ids = batch["input_ids"].to(self.device)
        te = self.model.text_encoder
        with torch.set_grad_enabled(self.train_text_encoder):
            if self.weighted_captions:
                hidden = encode_weighted_tokens(te, ids, self.clip_skip)
                return apply_token_weights(hidden, batch["token_weights"].to(self.device))
            return encode_tokens(te, ids, self.clip_skip, self.max_token_length)

    def learning_rates(self, optimizer: Any) -> dict[str, float]:
        """Current lr per group, named as the reference logs them, and with ``--scale_weight_norms`` the step's
        ``max_norm/keys_scaled``, ``max_norm/max_key_norm`` and ``norm/avg_key_norm``."""
        out = {} if self.max_norm is None else dict(self.max_norm.logs)  # the step's max-norm values too
        for name, group in zip(self._group_names, optimizer.param_groups):
            out[name] = float(group["lr"]) if group.get("lr") is not None else 0.0
            if "d" in group:  # D-Adaptation / Prodigy
                out[name.replace("lr/", "lr/d*lr/")] = float(group["d"] * group["lr"])
        return out

    def save(self, output_dir: Path, name: str, *, epoch: int, step: int, final: bool) -> Path:
        """Write ``output_dir/name.<ext>`` with the ``ss_*`` metadata (safetensors only)."""
        path = Path(output_dir) / f"{name}{SAVE_EXTENSIONS[self.save_format]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = self.metadata(epoch, step, final) if self.save_format == "safetensors" else None
        self.network.save_weights(str(path), self.save_dtype, metadata)
        return path
