"""The ``modelspec.*`` header (Stability AI's model spec) of saved LoRA, embedding and whole-model
``.safetensors`` files, as the reference writes it, and the ``--metadata_*`` options that fill its free-text
fields. :func:`modelspec_metadata` is the one builder every writer uses: train_network.py's metadata, Textual
Inversion embeddings (XTI files carry no header, as the reference's), DreamBooth / fine-tuning checkpoints and
:func:`library.models.save.save_model` (converted and merged models). A run's part of the header is its
:class:`HeaderFields` (:func:`run_fields`).

Keys, always: ``sai_model_spec`` (1.0.1), ``architecture`` (``stable-diffusion-v1``,
``stable-diffusion-v2-512`` or ``stable-diffusion-v2-768-v``, with ``/lora`` or ``/textual-inversion``
for adapters), ``implementation`` (``diffusers`` for LoRA, Stability AI's repository for embeddings and
checkpoints), ``implementation_version``, ``title``, ``date`` (ISO, local time, whole seconds),
``resolution`` (``WxH`` of the training resolution), ``prediction_type`` (``epsilon`` / ``v``); when
given: ``encoder_layer`` (``--clip_skip``), ``author``, ``description``, ``license``, ``tags`` and, as later
kohya versions add them, ``usage_hint``, ``thumbnail`` (a ``data:<mime>;base64,...`` URL: a file path given to
``--metadata_thumbnail`` is read and encoded), ``merged_from``, ``trigger_phrase``, ``preprocessor`` and
``is_negative_embedding`` — each the option's text as given.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import mimetypes
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.option_groups import MetadataOptions

SAI_MODEL_SPEC = "1.0.1"
IMPL_DIFFUSERS = "diffusers"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
ADAPTERS = {"lora": "LoRA", "textual-inversion": "TextualInversion", None: "Checkpoint"}
#: free-text fields of the ``--metadata_*`` options, in the order they are written
USER_FIELDS = ("author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from",
               "trigger_phrase", "preprocessor", "is_negative_embedding")


def add_metadata_arguments(parser: argparse.ArgumentParser) -> None:
    """``--metadata_title``, ``--metadata_author``, ``--metadata_description``, ``--metadata_license``,
    ``--metadata_tags``, ``--metadata_usage_hint``, ``--metadata_thumbnail``, ``--metadata_merged_from``,
    ``--metadata_trigger_phrase``, ``--metadata_preprocessor``, ``--metadata_is_negative_embedding``
    (kohya's names; every one a string written as given, the thumbnail as a data URL)."""
    g = parser.add_argument_group("file metadata (modelspec.* of LoRA and embedding .safetensors)")
    a = g.add_argument
    a("--metadata_title", type=str, default=None, help="modelspec.title (default: --output_name)")
    a("--metadata_author", type=str, default=None, help="modelspec.author")
    a("--metadata_description", type=str, default=None, help="modelspec.description")
    a("--metadata_license", type=str, default=None, help="modelspec.license")
    a("--metadata_tags", type=str, default=None, help="modelspec.tags (comma-separated)")
    a("--metadata_usage_hint", type=str, default=None, help="modelspec.usage_hint (how to use the model)")
    a("--metadata_thumbnail", type=str, default=None,
      help="modelspec.thumbnail: an image file (stored as a data: URL) or a data: URL")
    a("--metadata_merged_from", type=str, default=None, help="modelspec.merged_from (source models)")
    a("--metadata_trigger_phrase", type=str, default=None, help="modelspec.trigger_phrase")
    a("--metadata_preprocessor", type=str, default=None, help="modelspec.preprocessor")
    a("--metadata_is_negative_embedding", type=str, default=None,
      help="modelspec.is_negative_embedding (text as given, e.g. true)")


def architecture(v2: bool, v_parameterization: bool, adapter: str | None = None) -> str:
    """``stable-diffusion-v1`` / ``-v2-512`` / ``-v2-768-v``, plus ``/<adapter>``."""
    if v2:
        arch = "stable-diffusion-v2-768-v" if v_parameterization else "stable-diffusion-v2-512"
    else:
        arch = "stable-diffusion-v1"
    return f"{arch}/{adapter}" if adapter else arch


def base_model_version(v2: bool, v_parameterization: bool) -> str:
    """``ss_base_model_version``: ``sd_v1`` / ``sd_v2``, with ``_v`` for v-prediction."""
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if v_parameterization else "")


def training_resolution(group: Any) -> tuple[int, int] | None:
    """The (width, height) of the first dataset of a dataset group, or None when it has none."""
    for ds in getattr(group, "datasets", None) or []:
        reso = getattr(getattr(ds, "settings", None), "resolution", None)
        if reso:
            return (int(reso[0]), int(reso[1]))
    return None


def file_date(timestamp: float) -> str:
    """``modelspec.date``: ``timestamp`` as ISO 8601 local time in whole seconds."""
    return datetime.datetime.fromtimestamp(int(timestamp)).isoformat()


def modelspec_metadata(*, v2: bool, v_parameterization: bool, adapter: str | None, title: str | None = None,
                       resolution: tuple[int, int] | None = None, timestamp: float | None = None,
                       clip_skip: int | None = None, user: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The ``modelspec.*`` keys of one saved file (see the module docstring): the one place they are made,
    for LoRA, embedding and whole-model files alike (writers go through :meth:`HeaderFields.header`).

    ``adapter`` is ``"lora"``, ``"textual-inversion"`` or None (a whole checkpoint); ``title`` None gives
    ``LoRA@<unix time>`` etc. as the reference does; ``resolution`` None the model's native size;
    ``timestamp`` (default now) the date."""
    from library import __version__

    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}")
    if timestamp is None:
        timestamp = time.time()
    if resolution is None:
        side = 768 if v2 and v_parameterization else 512
        resolution = (side, side)
    meta = {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC,
        "modelspec.architecture": architecture(v2, v_parameterization, adapter),
        "modelspec.implementation": IMPL_DIFFUSERS if adapter == "lora" else IMPL_STABILITY_AI,
        "modelspec.implementation_version": f"sd-train/{__version__}",
        "modelspec.title": title or f"{ADAPTERS[adapter]}@{int(timestamp)}",
        "modelspec.date": file_date(timestamp),
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }
    if clip_skip is not None:
        meta["modelspec.encoder_layer"] = str(clip_skip)
    for name in USER_FIELDS:
        value = (user or {}).get(name)
        if value is not None:
            meta[f"modelspec.{name}"] = value
    return meta


@dataclass(frozen=True)
class HeaderFields:
    """What a file's ``modelspec`` header takes from its run rather than from the model: the title, the
    training resolution, ``--clip_skip`` and the ``--metadata_*`` free-text fields (made by :func:`run_fields`;
    ``HeaderFields(title=name)`` for a file saved outside a training run)."""

    title: str | None = None
    resolution: tuple[int, int] | None = None
    clip_skip: int | None = None
    user: Mapping[str, str | None] = field(default_factory=dict)

    def header(self, *, v2: bool, v_parameterization: bool, adapter: str | None,
               timestamp: float | None = None) -> dict[str, str]:
        """The ``modelspec.*`` keys of a file of this run (:func:`modelspec_metadata`) for a model of that
        version and prediction type; ``adapter`` as there; ``timestamp`` (default now) gives the date."""
        return modelspec_metadata(v2=v2, v_parameterization=v_parameterization, adapter=adapter, title=self.title,
                                  resolution=self.resolution, timestamp=timestamp, clip_skip=self.clip_skip,
                                  user=self.user)


def thumbnail_data_url(value: str) -> str:
    """``--metadata_thumbnail`` as written: a ``data:`` URL unchanged, a file as ``data:<mime>;base64,<bytes>``
    (the MIME type from the file name, ``application/octet-stream`` when unknown), as kohya writes it."""
    if value.startswith("data:"):
        return value
    from library.errors import UserError

    mime = mimetypes.guess_type(value)[0] or "application/octet-stream"
    try:
        data = Path(value).read_bytes()
    except OSError as exc:
        raise UserError(f"--metadata_thumbnail {value}: cannot read it ({exc.strerror or exc})") from None
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def metadata_problems(args: argparse.Namespace) -> list[str]:
    """A ``--metadata_thumbnail`` that is neither a data URL nor a readable file (checked before training)."""
    value = args.metadata_thumbnail
    if value and not value.startswith("data:") and not Path(value).is_file():
        return [f"--metadata_thumbnail {value}: no such file (give an image file or a data: URL)"]
    return []


def user_fields(metadata: MetadataOptions) -> dict[str, str | None]:
    """The free-text ``modelspec`` fields from the ``--metadata_*`` options of ``metadata`` (None where not
    given); the thumbnail read into a data URL."""
    fields = {name: getattr(metadata, f"metadata_{name}") for name in USER_FIELDS}
    if fields["thumbnail"]:
        fields["thumbnail"] = thumbnail_data_url(fields["thumbnail"])
    return fields


def run_fields(metadata: MetadataOptions, *, output_name: str | None, clip_skip: int | None,
               group: Any) -> HeaderFields:
    """The :class:`HeaderFields` of a training run: the title ``--metadata_title``, else ``output_name`` (the
    stem of the run's saves: ``--output_name``, or the method's default such as Textual Inversion's token;
    None gives the reference's ``LoRA@<time>``-style title), the resolution of the first dataset of
    ``group``, ``clip_skip`` (``--clip_skip``) and the other ``--metadata_*`` fields of ``metadata``."""
    return HeaderFields(title=metadata.metadata_title or output_name, resolution=training_resolution(group),
                        clip_skip=clip_skip, user=user_fields(metadata))
