"""Full-model training (train_db.py DreamBooth, fine_tune.py): the UNet, and the text encoder while it
trains, are the trained weights; the result is a whole Stable Diffusion model.

Text-encoder policy, as one number ``text_encoder_steps``: None trains it for the whole run, 0 never
(it is not given to the optimizer and stays in the frozen dtype), N > 0 trains it for the first N
optimizer steps and freezes it from then on (DreamBooth's ``--stop_text_encoder_training N``).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch

from library.data.tokens import (apply_token_weights, encode_tokens, encode_weighted_tokens,
                                 tokenize_captions_no_padding)
from library.errors import UserError

from library.methods.base import MethodBase, MethodStart
from library.option_groups import DreamBoothOptions, FineTuneOptions, Options
from library.output_safety import OutputLayout
from library.training.te_cache import TextEncoderUse

logger = logging.getLogger(__name__)

FULL_MODEL_FORMATS = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")


def add_full_model_saving_arguments(parser: argparse.ArgumentParser) -> None:
    """The saving options of train_db.py / fine_tune.py: the shared group with the four whole-model
    formats (default None = the input model's family) plus ``--use_safetensors``."""
    from library.training import args as training_args

    training_args.add_saving_arguments(parser, model_formats=FULL_MODEL_FORMATS, default_format=None)
    for action in parser._actions:
        if "--save_model_as" in action.option_strings:
            action.help = ("format of saved models: ckpt, safetensors (ldm single files), diffusers, "
                           "diffusers_safetensors (folders); default: the family of the input model")
    g = parser.add_argument_group("whole-model saving")
    g.add_argument("--use_safetensors", action="store_true",
                   help="write safetensors: with --save_model_as unset or ckpt → .safetensors, diffusers → "
                        "diffusers_safetensors")


def resolve_save_format(save_model_as: str | None, use_safetensors: bool, source_format: str) -> str:
    """The format a full model is written in.

    ``save_model_as`` None means the input model's family: an ldm file gives ``ckpt``, a diffusers folder
    or Hub id gives ``diffusers``. ``use_safetensors`` then turns ``ckpt`` into ``safetensors`` and
    ``diffusers`` into ``diffusers_safetensors`` (also when they were asked for explicitly).
    """
    fmt = save_model_as or ("ckpt" if source_format == "ldm" else "diffusers")
    if fmt not in FULL_MODEL_FORMATS:
        raise UserError(f"--save_model_as {fmt}: expected one of {', '.join(FULL_MODEL_FORMATS)}")
    if use_safetensors:
        fmt = {"ckpt": "safetensors", "diffusers": "diffusers_safetensors"}.get(fmt, fmt)
    return fmt


def output_layout(save_model_as: str | None, use_safetensors: bool, model_path: str) -> OutputLayout:
    """``<name>.ckpt`` / ``.safetensors`` checkpoints or ``<name>/`` diffusers folders, as
    :func:`resolve_save_format` chooses for the input model ``model_path``."""
    source = "ldm" if Path(os.path.expanduser(str(model_path))).is_file() else "diffusers"
    fmt = resolve_save_format(save_model_as, use_safetensors, source)
    if fmt in ("ckpt", "safetensors"):
        return OutputLayout("checkpoint", f".{fmt}")
    return OutputLayout("diffusers", "/")


def text_encoder_steps(script: str, dreambooth: DreamBoothOptions, fine_tune: FineTuneOptions) -> int | None:
    """The text-encoder policy of ``script`` (see the module docstring): DreamBooth's
    ``--stop_text_encoder_training N`` (None = the whole run, negative or 0 = never), fine-tuning's
    ``--train_text_encoder`` (the whole run, else never)."""
    if script == "dreambooth":
        stop = dreambooth.stop_text_encoder_training
        return None if stop is None else max(0, stop)
    return None if fine_tune.train_text_encoder else 0


def text_encoder_use(script: str, steps: int | None) -> TextEncoderUse:
    """The text encoder of ``script`` trained for ``steps`` (:func:`text_encoder_steps`), with what freezes it."""
    why = ("DreamBooth trains it unless --stop_text_encoder_training is 0 or negative" if script == "dreambooth"
           else "--train_text_encoder trains it")
    return TextEncoderUse(steps=steps, why=why)


def method_start(script: str):
    """The start of a train_db.py (``script`` "dreambooth") or fine_tune.py ("finetune") run, as a function of
    the options (:class:`~library.methods.base.MethodStart`): saves named ``--output_name`` in the format of
    :func:`output_layout`, and the dry run's :func:`dry_run_plan`."""

    def start(opts: Options) -> MethodStart:
        steps = text_encoder_steps(script, opts.dreambooth, opts.fine_tune)
        layout = output_layout(opts.save.save_model_as, opts.save.use_safetensors,
                               opts.model.pretrained_model_name_or_path)
        return MethodStart(layout=layout, output_name=opts.save.output_name,
                           text_encoder_use=text_encoder_use(script, steps),
                           dry_run_plan=lambda: dry_run_plan(script, layout, text_encoder_steps=steps,
                                                             learning_rate_te=opts.optimizer.learning_rate_te))

    return start


def prepare_method(script: str, opts: Options, run: Any, *, save_dtype: torch.dtype | None) -> "FullModelMethod":
    """Prepare the loaded model of ``run`` (a :class:`library.training.session.PreparedRun`) with
    :func:`prepare_full_model` and return its :class:`FullModelMethod`, from the options of ``script``
    ("dreambooth" or "finetune"): the text-encoder policy (:func:`text_encoder_steps`), --gradient_checkpointing,
    --full_fp16 / --full_bf16, --clip_skip, --max_token_length, --weighted_captions, --no_token_padding
    (DreamBooth), --save_model_as / --use_safetensors, --learning_rate_te and the modelspec fields
    (:func:`library.modelspec.run_fields`). ``save_dtype`` is ``--save_precision``'s."""
    from library.modelspec import run_fields

    model, device = run.model, run.accelerator.device
    steps = text_encoder_steps(script, opts.dreambooth, opts.fine_tune)
    prepare_full_model(model, text_encoder_trains=steps != 0, gradient_checkpointing=opts.model.gradient_checkpointing,
                       device=device, weight_dtype=run.weight_dtype,
                       full_half=opts.training.full_half, vae_dtype=run.vae_dtype)
    return FullModelMethod(model=model, text_encoder_steps=steps, clip_skip=opts.model.clip_skip,
                           max_token_length=opts.data.max_token_length, weighted_captions=opts.data.weighted_captions,
                           no_token_padding=script == "dreambooth" and opts.dreambooth.no_token_padding,
                           save_format=resolve_save_format(opts.save.save_model_as, opts.save.use_safetensors,
                                                           model.source_format),
                           save_dtype=save_dtype, device=device,
                           header=run_fields(opts.metadata, output_name=run.output_name,
                                             clip_skip=opts.model.clip_skip, group=run.group),
                           learning_rate_te=opts.optimizer.learning_rate_te)


def output_path(output_dir: Path, name: str, save_format: str) -> Path:
    """``output_dir/name.ckpt`` / ``name.safetensors`` for ldm files, ``output_dir/name/`` for diffusers."""
    if save_format in ("ckpt", "safetensors"):
        return Path(output_dir) / f"{name}.{save_format}"
    return Path(output_dir) / name


def prepare_full_model(model: Any, *, text_encoder_trains: bool, gradient_checkpointing: bool,
                       device: torch.device, weight_dtype: torch.dtype, full_half: bool,
                       vae_dtype: torch.dtype | None = None) -> None:
    """Set requires_grad, dtypes and devices for full-model training (training_options.md §10).

    UNet: trainable, fp32 (``weight_dtype`` with --full_fp16/--full_bf16). Text encoder: the same when it
    trains, else frozen in ``weight_dtype``. VAE: frozen in ``vae_dtype`` (float32 with --no_half_vae),
    default ``weight_dtype``.
    """
    from library.models.placement import place

    unet, te, vae = model.unet, model.text_encoder, model.vae
    vae.requires_grad_(False)
    vae.eval()
    unet.requires_grad_(True)
    te.requires_grad_(text_encoder_trains)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if text_encoder_trains:
            te.gradient_checkpointing_enable()
    trained_dtype = weight_dtype if full_half else torch.float32
    place(unet, device, trained_dtype)
    place(te, device, trained_dtype if text_encoder_trains else weight_dtype)
    place(vae, device, vae_dtype or weight_dtype)
    if not text_encoder_trains:
        te.eval()


class FullModelMethod(MethodBase):
    """Train the UNet (and the text encoder while it trains) of a Stable Diffusion model in place."""

    name = "full_model"

    def __init__(self, *, model: Any, text_encoder_steps: int | None, clip_skip: int | None,
                 max_token_length: int | None, weighted_captions: bool, no_token_padding: bool,
                 save_format: str, save_dtype: torch.dtype | None, device: torch.device,
                 header: Any = None, learning_rate_te: float | None = None):
        """``text_encoder_steps``: None = whole run, 0 = never, N = the first N optimizer steps. ``header``:
        the run's :class:`library.modelspec.HeaderFields` (:func:`library.modelspec.run_fields`), for the
        ``modelspec`` header of ``.safetensors`` checkpoints (default: titled with the file's stem).

        ``learning_rate_te`` (``--learning_rate_te``): the text encoder's own lr in a second optimizer group
        (None: one group at ``--learning_rate``; ignored while the text encoder never trains).

        Call :func:`prepare_full_model` first (with ``text_encoder_trains = text_encoder_steps != 0``).
        """
        if text_encoder_steps is not None and text_encoder_steps < 0:
            raise ValueError("text_encoder_steps must be None or >= 0")
        self.model = model
        self.text_encoder_steps = text_encoder_steps
        self.text_encoder_in_optimizer = text_encoder_steps != 0
        self.text_encoder_training = self.text_encoder_in_optimizer
        self.clip_skip, self.max_token_length = clip_skip, max_token_length
        self.weighted_captions, self.no_token_padding = weighted_captions, no_token_padding
        self.save_format, self.save_dtype = save_format, save_dtype
        self.device = device
        self.header = header
        if weighted_captions and no_token_padding:
            logger.warning("--no_token_padding has no effect with --weighted_captions (weighted captions are "
                           "encoded in 77-token chunks)")
        params = [p for p in model.unet.parameters()]
        self._te_params: list[torch.nn.Parameter] = []
        if self.text_encoder_in_optimizer:
            self._te_params = [p for p in model.text_encoder.parameters()]
            params += self._te_params
        self._params = params
        self.learning_rate_te = learning_rate_te if self.text_encoder_in_optimizer else None
        if learning_rate_te is not None and not self.text_encoder_in_optimizer:
            logger.warning("--learning_rate_te has no effect: the text encoder does not train in this run")

    # ---- what trains --------------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        """One group over every trained parameter, at the optimizer's default lr (``--learning_rate``); with
        ``--learning_rate_te`` two, as kohya builds them: the UNet's, then the text encoder's at that lr."""
        if self.learning_rate_te is None:
            return [{"params": list(self._params)}]
        unet = self._params[:len(self._params) - len(self._te_params)]
        return [{"params": unet}, {"params": list(self._te_params), "lr": self.learning_rate_te}]

    def replace_parameters(self, new_of: dict[int, torch.nn.Parameter]) -> None:
        """Train ``new_of[id(p)]`` instead of each parameter ``p`` (FSDP's sharded parameters)."""
        self._params = [new_of.get(id(p), p) for p in self._params]
        self._te_params = [new_of.get(id(p), p) for p in self._te_params]

    def learning_rates(self, optimizer: Any) -> dict[str, float]:
        """``lr`` of the single group, or with ``--learning_rate_te`` kohya's names ``lr/unet`` and
        ``lr/text_encoder1`` (plus ``lr/d*lr/...`` for D-Adaptation / Prodigy)."""
        if len(optimizer.param_groups) == 1:
            return super().learning_rates(optimizer)
        out = {}
        for name, group in zip(("unet", "text_encoder1"), optimizer.param_groups):
            lr = float(group["lr"]) if group.get("lr") is not None else 0.0
            out[f"lr/{name}"] = lr
            if "d" in group:
                out[f"lr/d*lr/{name}"] = float(group["d"] * lr)
        return out

    def _modules(self) -> dict[str, torch.nn.Module]:
        modules = {"unet": self.model.unet}
        if self.text_encoder_in_optimizer:
            modules["text_encoder"] = self.model.text_encoder
        return modules

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """``unet.<key>`` and (when it is trained at all) ``text_encoder.<key>`` weights."""
        return {f"{prefix}.{key}": tensor for prefix, module in self._modules().items()
                for key, tensor in module.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`trainable_state_dict` output exactly (every key must be present)."""
        for prefix, module in self._modules().items():
            lead = prefix + "."
            part = {k[len(lead):]: v for k, v in state.items() if k.startswith(lead)}
            try:
                module.load_state_dict(part, strict=True)
            except RuntimeError as exc:
                raise UserError(f"--resume: the saved {prefix} weights do not fit this model "
                                f"({str(exc).strip().splitlines()[0][:200]})") from None

    # ---- the loop's hooks ---------------------------------------------------------------------

    def set_train(self, training: bool) -> None:
        """UNet in train mode while training; the text encoder only while it still trains."""
        self.model.unet.train(training)
        self.model.text_encoder.train(training and self.text_encoder_training)

    def conditioning(self, batch: dict[str, Any]) -> torch.Tensor:
        """Text-encoder hidden states, with gradients only while the text encoder trains.

        With ``--no_token_padding`` the processed captions are tokenized again, padded only to the
        batch's longest caption (encoded as-is, §7.6); ``--weighted_captions`` takes precedence.
        """
        te = self.model.text_encoder
        with torch.set_grad_enabled(self.text_encoder_training):
            if self.weighted_captions:
                hidden = encode_weighted_tokens(te, batch["input_ids"].to(self.device), self.clip_skip)
                return apply_token_weights(hidden, batch["token_weights"].to(self.device))
            if self.no_token_padding:
                ids = tokenize_captions_no_padding(self.model.tokenizer, batch["captions"])
            else:
                ids = batch["input_ids"]
            return encode_tokens(te, ids.to(self.device), self.clip_skip, self.max_token_length)

    def after_step(self, global_step: int) -> None:
        """Freeze the text encoder once ``global_step`` reaches ``text_encoder_steps`` (idempotent, so it
        may also be called right after ``--resume`` with the resumed step)."""
        steps = self.text_encoder_steps
        if self.text_encoder_training and steps is not None and global_step >= steps:
            te = self.model.text_encoder
            te.requires_grad_(False)
            te.eval()
            for p in te.parameters():
                p.grad = None
            self.text_encoder_training = False
            logger.info("text encoder training stopped at step %d; the UNet continues", global_step)

    def save(self, output_dir: Path, name: str, *, epoch: int, step: int, final: bool) -> Path:
        """Write the whole model (UNet, text encoder, VAE) as ``name.ckpt``/``name.safetensors`` or a
        diffusers folder ``name/``, atomically, in ``--save_precision``."""
        from library.models.save import save_model

        path = output_path(Path(output_dir), name, self.save_format)
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_model(self.model, path, self.save_format, save_dtype=self.save_dtype, epoch=epoch,
                          global_step=step, header=self.header)


DRY_RUN_TITLES = {"dreambooth": "DreamBooth (train_db.py)", "finetune": "fine-tuning (fine_tune.py)"}


def dry_run_plan(script: str, layout: OutputLayout, *, text_encoder_steps: int | None,
                 learning_rate_te: float | None) -> Any:
    """The full model's part of ``--dry_run`` (a :class:`library.dry_run.plan.DryRunPlan`) for ``script``
    ("dreambooth" or "finetune"): the whole UNet trains, and the text encoder unless ``text_encoder_steps``
    is 0 (as for :class:`FullModelMethod`: None = whole run, N = the first N steps); ``learning_rate_te``
    (--learning_rate_te) gives the text encoder its own optimizer group. Dtypes as :func:`prepare_full_model`."""
    from library.dry_run.plan import DryRunPlan, Precision, Trainable, numel

    te_trains = text_encoder_steps != 0

    def trainable(meta: Any, precision: Precision) -> Trainable:
        trained_dtype = precision.trained_dtype
        meta.unet.requires_grad_(True)
        params = list(meta.unet.parameters())
        parts = {"UNet (all weights)": numel(params)}
        notes = []
        if te_trains:
            meta.text_encoder.requires_grad_(True)
            te_params = list(meta.text_encoder.parameters())
            params += te_params
            parts["text encoder (all weights)"] = numel(te_params)
            if text_encoder_steps:
                notes.append(f"the text encoder trains for the first {text_encoder_steps} steps only (its optimizer "
                             "state stays)")
        groups: list[tuple[str, float | None]] = [("all", None)]
        if te_trains and learning_rate_te is not None:  # two optimizer groups, as trained
            groups = [("unet", None), ("text encoder", learning_rate_te)]
        count = numel(params)
        return Trainable(shapes=[p.shape for p in params], parts=parts, groups=groups, dtype=trained_dtype,
                         component_dtypes={"unet": trained_dtype,
                                           "text_encoder": trained_dtype if te_trains else precision.weight_dtype,
                                           "vae": precision.weight_dtype},
                         text_encoder_in_grad_path=te_trains,
                         autocast_copies=count if trained_dtype == torch.float32 else 0,
                         ema_elements=count, notes=notes)

    return DryRunPlan(method=script, title=DRY_RUN_TITLES[script], layout=layout, trainable=trainable)
