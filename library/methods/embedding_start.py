"""The start and preparation of Textual Inversion and XTI: what train_textual_inversion.py and
train_textual_inversion_XTI.py hand to the shared start call and then train.

It sits apart from textual_inversion.py and xti.py because it needs both (XTI builds on the
Textual Inversion helpers, so textual_inversion.py cannot import xti.py).
"""

from __future__ import annotations

from typing import Any, Callable

from library.errors import UserError
from library.methods import textual_inversion as ti
from library.methods import xti as xti_method
from library.methods.base import MethodStart
from library.option_groups import Options


def check_start(token_string: str | None, num_vectors: int, weighted_captions: bool) -> str:
    """The checks only these scripts make, before the shared start: ``--token_string`` (see
    :func:`library.methods.textual_inversion.check_options`) and no ``--weighted_captions``; returns the token."""
    token = ti.check_options(token_string, num_vectors)
    if weighted_captions:
        raise UserError("--weighted_captions is not supported by Textual Inversion training")
    return token


def caption_replacements(opts: Options, token: str) -> dict[str, str]:
    """The caption replacements of the run: the token's vectors, and the object / style templates."""
    return ti.caption_replacements(token, opts.embedding.num_vectors_per_token,
                                   object_template=opts.embedding.use_object_template,
                                   style_template=opts.embedding.use_style_template)


def debug_extras(token: str) -> Callable[[Options], dict[str, Any]]:
    """What ``--debug_dataset`` shows besides the dataset: the caption replacements and the new tokens."""
    def extras(opts: Options) -> dict[str, Any]:
        return dict(replacements=caption_replacements(opts, token),
                    new_tokens=ti.token_strings(opts.embedding.token_string, opts.embedding.num_vectors_per_token))
    return extras


def method_start(token: str, *, xti: bool) -> Callable[[Options], MethodStart]:
    """The :class:`MethodStart` of Textual Inversion (``xti``: XTI) for ``token``: the embedding save
    layout, the saves named after the token unless ``--output_name`` is given, the frozen text encoder,
    the dry-run plan and the caption replacements every dataset gets."""
    def start(opts: Options) -> MethodStart:
        captions = caption_replacements(opts, token)

        def configure_group(group: Any) -> None:
            group.replacements = captions
            if not captions.get(""):
                ti.warn_captions_without_token(group, token)

        layout = ti.output_layout(opts.save.save_model_as)
        planner = xti_method.dry_run_plan if xti else ti.dry_run_plan
        return MethodStart(layout=layout, output_name=opts.save.output_name or token,  # the token by default
                           text_encoder_use=ti.TEXT_ENCODER_USE,
                           dry_run_plan=lambda: planner(opts.embedding, layout), configure_group=configure_group)
    return start


def prepare_method(started: Any, token: str, *, xti: bool) -> tuple[Any, str]:
    """Add the token rows, freeze and place the model, and build the method object of a started run
    (a :class:`library.training.session.StartedRun`); returns ``(method, description)``."""
    from library.modelspec import run_fields

    opts, run = started.opts, started.run
    device, vectors = run.accelerator.device, opts.embedding.num_vectors_per_token
    common = dict(model=run.model, token_string=token, clip_skip=opts.model.clip_skip,
                  max_token_length=opts.data.max_token_length, save_format=opts.save.save_model_as,
                  save_dtype=started.save_dtype, device=device,
                  gradient_checkpointing=opts.model.gradient_checkpointing,
                  header=run_fields(opts.metadata, output_name=run.output_name, clip_skip=opts.model.clip_skip,
                                    group=run.group))
    placement = dict(seed=run.seed, gradient_checkpointing=opts.model.gradient_checkpointing, device=device,
                     weight_dtype=run.weight_dtype, vae_dtype=run.vae_dtype, full_half=opts.training.full_half)
    if xti:
        layers, ids = xti_method.prepare_xti(run.model, run.tokenizer, opts.embedding, **placement)
        method = xti_method.XTIMethod(layer_names=layers, num_vectors=vectors, token_ids=ids, **common)
        return method, f"XTI, {vectors} vector(s) x {len(layers)} layers for {token!r}"
    ids = ti.prepare_textual_inversion(run.model, run.tokenizer, opts.embedding, **placement)
    method = ti.TextualInversionMethod(token_ids=ids, **common)
    return method, f"Textual Inversion, {len(ids)} vector(s) for {token!r}"


def sampler_options(method: Any, token: str, num_vectors: int, *, xti: bool) -> dict[str, Any]:
    """How sample prompts are written for the run: the token expanded to its vectors; XTI's per-layer encoder."""
    return dict(prompt_transform=ti.expand_prompt(token, num_vectors),
                layer_encoder=method.encode_layers if xti else None)
