"""LoRA-family network training: the UNet and text encoder stay frozen; a ``networks/`` module trains."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Callable

import torch

from library.data.tokens import encode_tokens, encode_weighted_tokens, apply_token_weights
from library.errors import UserError
from library.methods.base import MethodBase, MethodStart
from library.option_groups import ModelOptions, NetworkOptions, OptimizerOptions, Options
from library.output_safety import OutputLayout
from library.training.te_cache import TextEncoderUse

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


def trained_parts(network: NetworkOptions) -> tuple[bool, bool]:
    """``(UNet modules train, text-encoder modules train)``: both unless --network_train_text_encoder_only /
    --network_train_unet_only."""
    return not network.network_train_text_encoder_only, not network.network_train_unet_only


def text_encoder_use(network: NetworkOptions) -> TextEncoderUse:
    """LoRA's text encoder: its network modules train for the whole run unless --network_train_unet_only."""
    return TextEncoderUse(steps=None if trained_parts(network)[1] else 0,
                          why="LoRA trains text-encoder modules unless --network_train_unet_only is given")


def method_start(opts: Options) -> MethodStart:
    """train_network.py's part of the start of a run: --network_module must import and --network_args parse
    before anything loads; the files are named ``--output_name`` (``--save_model_as``: their suffix)."""
    from library.config.arguments import parse_network_args

    import_network_module(opts.network.network_module)
    parse_network_args(opts.network.network_args)
    layout = output_layout(opts.save.save_model_as)
    return MethodStart(layout=layout, output_name=opts.save.output_name,
                       text_encoder_use=text_encoder_use(opts.network),
                       dry_run_plan=lambda: dry_run_plan(opts.network, learning_rate=opts.optimizer.learning_rate,
                                                         layout=layout))


def create_network(network: NetworkOptions, model: Any) -> Any:
    """The network of ``--network_module`` for ``model`` (:func:`network_text_encoder`'s view of its text
    encoder): from ``--network_weights`` with ``--dim_from_weights``, else ``--network_dim`` /
    ``--network_alpha`` / ``--network_dropout``, with ``--network_args``. Not yet applied to the model."""
    from library.config.arguments import parse_network_args

    module = import_network_module(network.network_module)
    kwargs = parse_network_args(network.network_args)
    te_view = network_text_encoder(network.network_module, model.text_encoder)  # kohya's names for LyCORIS
    if network.network_weights and network.dim_from_weights:
        built, _ = module.create_network_from_weights(1.0, network.network_weights, model.vae, te_view, model.unet,
                                                      **kwargs)
        return built
    return module.create_network(1.0, network.network_dim, network.network_alpha, model.vae, te_view, model.unet,
                                 neuron_dropout=network.network_dropout, **kwargs)


def prepare_network(model: Any, network: NetworkOptions, model_options: ModelOptions, *, device: torch.device,
                    weight_dtype: torch.dtype, vae_dtype: torch.dtype, full_half: bool) -> Any:
    """Freeze ``model``, merge ``--base_weights`` (``--base_weights_multiplier``) into it, create the network
    (:func:`create_network`), apply it to the trained parts (:func:`trained_parts`), load
    ``--network_weights``, and place everything; returns the network.

    Reads the :class:`NetworkOptions` and, of ``model_options``, --gradient_checkpointing and --fp8_base /
    --fp8_base_unet. The UNet computes in ``weight_dtype``, the text encoder in float32 and the VAE in
    ``vae_dtype`` (float32 with --no_half_vae); ``full_half`` (--full_fp16 / --full_bf16) keeps the network's
    weights and gradients in ``weight_dtype`` too."""
    from library.methods.network_base_weights import merge_base_weights
    from library.methods.network_extras import check_max_norm_support
    from library.models.fp8 import apply_fp8_storage, fp8_parts
    from library.models.placement import place

    train_unet, train_te = trained_parts(network)
    unet, te = model.unet, model.text_encoder
    for module in (unet, te, model.vae):
        module.requires_grad_(False)
        module.eval()
    merge_base_weights(network, text_encoder=te, unet=unet, v2=model.v2)  # --base_weights: into the frozen model first
    built = create_network(network, model)
    check_max_norm_support(built, network.network_module, network.scale_weight_norms)
    built.apply_to(te, unet, train_te, train_unet)
    if network.network_weights:
        try:
            built.load_weights(network.network_weights)
        except RuntimeError as exc:  # shape mismatches
            raise UserError(f"--network_weights {network.network_weights}: does not fit this network "
                            f"({str(exc).strip().splitlines()[-1][:200]}); try --dim_from_weights") from None
    if model_options.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        te.gradient_checkpointing_enable()
        unet.train()
        te.train()
        built.enable_gradient_checkpointing()
    place(unet, device, weight_dtype)
    place(te, device, torch.float32)
    place(model.vae, device, vae_dtype)
    apply_fp8_storage(fp8_parts(model_options.fp8_base, model_options.fp8_base_unet), unet, te, weight_dtype)
    built.to(device)
    if full_half:  # trainable weights and their gradients in the half dtype
        built.to(dtype=weight_dtype)
    if hasattr(built, "prepare_grad_etc"):
        built.prepare_grad_etc(te, unet)
    return built


def recorded_learning_rates(network: NetworkOptions, optimizer: OptimizerOptions, built: Any) -> dict[str, str]:
    """Learning-rate metadata as the optimizer left it (relative-step AdaFactor clears the lrs and sets
    the ``adafactor:<lr>`` scheduler); reads --unet_lr, --text_encoder_lr, --lr_scheduler."""
    cleared = built.group_lrs_cleared
    return {"ss_learning_rate": str(built.learning_rate),
            "ss_unet_lr": str(None if cleared else network.unet_lr),
            "ss_text_encoder_lr": str(None if cleared else network.text_encoder_lr),
            "ss_lr_scheduler": str(built.lr_scheduler or optimizer.lr_scheduler)}


class NetworkRunRecord:
    """What the ``ss_*`` / ``modelspec.*`` metadata of the run's files is made of, known before training: the
    options, the datasets, the plan, the seed and the model's family. The trainer's session id and start time
    and the optimizer are added by :meth:`metadata` when training starts."""

    def __init__(self, opts: Options, *, run: Any):
        """``run`` is the :class:`library.training.session.PreparedRun` (group, blueprint, plan, seed, model)."""
        self.opts, self.run = opts, run

    def metadata(self, *, session_id: int, started_at: float, built: Any) -> Any:
        """The :class:`~library.methods.network_metadata.RunMetadata` of every save (``--no_metadata``: the
        minimal keys only; the model hashes are deferred to the first save)."""
        from library.methods.network_metadata import RunMetadata, model_hash_jobs, network_metadata

        opts, run, model = self.opts, self.run, self.run.model
        base = network_metadata(opts, group=run.group, blueprint=run.blueprint, plan=run.plan, seed=run.seed,
                                session_id=session_id, started_at=started_at, optimizer_name=built.description,
                                v2=model.v2, v_parameterization=model.v_parameterization,
                                recorded_lrs=recorded_learning_rates(opts.network, opts.optimizer, built))
        no_metadata = opts.network.no_metadata
        return RunMetadata(base, {} if no_metadata else model_hash_jobs(opts.model), no_metadata)


class NetworkMethod(MethodBase):
    """Train a network (LoRA, DyLoRA, ...) applied to a frozen model."""

    name = "network"

    def __init__(self, *, model: Any, network: Any, train_unet: bool, train_text_encoder: bool,
                 text_encoder_lr: float | None, unet_lr: float | None, learning_rate: float,
                 clip_skip: int | None, max_token_length: int | None, weighted_captions: bool,
                 save_format: str, save_dtype: torch.dtype | None, device: torch.device,
                 record: NetworkRunRecord | None, max_norm: float | None = None):
        """``record`` makes the header of every safetensors save when training starts
        (:meth:`on_train_start`; None: no metadata); ``max_norm`` (``--scale_weight_norms``) regularises the
        network after every optimizer step."""
        from library.methods.network_extras import MaxNormRegularizer

        self.model, self.network = model, network
        self.max_norm = MaxNormRegularizer(network, max_norm, device) if max_norm else None
        self.train_unet, self.train_text_encoder = train_unet, train_text_encoder
        self.text_encoder_in_optimizer = self.text_encoder_training = train_text_encoder
        self.clip_skip, self.max_token_length = clip_skip, max_token_length
        self.weighted_captions = weighted_captions
        self.save_format, self.save_dtype = save_format, save_dtype
        self.device = device
        self.record = record
        self.metadata: Callable[[int, int, bool], dict[str, str]] | None = None  # set by on_train_start
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

    def on_train_start(self, trainer: Any, built: Any) -> None:
        """Make the run's file metadata from :attr:`record` with the trainer's (resumed) session id and start
        time and the optimizer's description."""
        if self.record is not None:
            self.metadata = self.record.metadata(session_id=trainer.progress.session_id,
                                                 started_at=trainer.progress.started_at, built=built)

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
        metadata = (self.metadata(epoch, step, final) if self.save_format == "safetensors" and self.metadata
                    else None)
        self.network.save_weights(str(path), self.save_dtype, metadata)
        return path


def _dry_run_group_names(count: int, train_unet: bool, train_te: bool) -> list[str]:
    """Names of the network's optimizer groups in the dry run's learning-rate table."""
    if count == 1:
        return ["text encoder" if train_te and not train_unet else "unet"]
    if count == 2 and train_te:
        return ["text encoder", "unet"]
    return [f"group {i}" for i in range(count)]


def dry_run_plan(network: Any, *, learning_rate: float, layout: OutputLayout) -> Any:
    """The network's part of ``--dry_run`` (a :class:`library.dry_run.plan.DryRunPlan`): the network is created
    by ``--network_module`` on the meta model exactly as training creates it, so its parameter count is exact.
    ``network`` is the :class:`~library.option_groups.NetworkOptions` (reads --network_module, --network_args,
    --network_dim, --network_alpha, --network_dropout, --network_weights, --dim_from_weights,
    --network_train_unet_only, --network_train_text_encoder_only, --unet_lr, --text_encoder_lr);
    ``learning_rate`` is --learning_rate."""
    from library.config.arguments import parse_network_args
    from library.dry_run.plan import DryRunPlan, Precision, Trainable, numel

    def trainable(meta: Any, precision: Precision) -> Trainable:
        module = import_network_module(network.network_module)
        kwargs = parse_network_args(network.network_args)
        train_unet, train_te = not network.network_train_text_encoder_only, not network.network_train_unet_only
        te, unet = meta.text_encoder, meta.unet
        try:
            with torch.device("meta"):
                if network.network_weights and network.dim_from_weights:
                    built, _ = module.create_network_from_weights(1.0, network.network_weights, meta.vae, te, unet,
                                                                  **kwargs)
                else:
                    built = module.create_network(1.0, network.network_dim, network.network_alpha, meta.vae, te, unet,
                                                  neuron_dropout=network.network_dropout, **kwargs)
                built.apply_to(te, unet, train_te, train_unet)
                groups = built.prepare_optimizer_params(network.text_encoder_lr, network.unet_lr, learning_rate)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - a third-party network module may not build on meta tensors
            raise UserError(f"--dry_run: cannot build {network.network_module} on the meta device to count its "
                            f"parameters ({type(exc).__name__}: {exc})") from None
        groups = groups if isinstance(groups[0], dict) else [{"params": list(groups)}]
        params = [p for g in groups for p in g["params"]]
        parts = {}
        for label, loras in (("network: text encoder", getattr(built, "text_encoder_loras", None)),
                             ("network: UNet", getattr(built, "unet_loras", None))):
            if loras:
                parts[f"{label} ({len(loras)} modules)"] = numel(p for lora in loras for p in lora.parameters())
        if not parts:
            parts["network"] = numel(params)
        names = _dry_run_group_names(len(groups), train_unet, train_te)
        count = numel(params)
        own_copies = count if precision.trained_dtype == torch.float32 else 0  # --full_fp16/bf16: already half
        te_copies = numel(te.parameters()) if train_te else 0  # the text encoder stays fp32 for networks
        return Trainable(shapes=[p.shape for p in params], parts=parts,
                         groups=[(n, g.get("lr")) for n, g in zip(names, groups)], dtype=precision.trained_dtype,
                         component_dtypes={"unet": precision.weight_dtype, "text_encoder": torch.float32,
                                           "vae": precision.weight_dtype},
                         text_encoder_in_grad_path=train_te, autocast_copies=own_copies + te_copies,
                         extra_weights=count, ema_elements=count, network=built)

    return DryRunPlan(method="network", title="LoRA-family network (train_network.py)", layout=layout,
                      trainable=trainable)
