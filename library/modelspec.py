"""The ``modelspec.*`` header (Stability AI's model spec) of saved LoRA and embedding files, as the
reference writes it, and the ``--metadata_*`` options that fill its free-text fields.

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
from pathlib import Path
from typing import Any

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


def modelspec_metadata(*, v2: bool, v_parameterization: bool, adapter: str | None, title: str | None,
                       resolution: tuple[int, int] | None, timestamp: float, clip_skip: int | None = None,
                       user: dict[str, str | None] | None = None) -> dict[str, str]:
    """The ``modelspec.*`` keys of one saved file (see the module docstring).

    ``adapter`` is ``"lora"``, ``"textual-inversion"`` or None (a whole checkpoint); ``title`` None gives
    ``LoRA@<unix time>`` etc. as the reference does; ``resolution`` None the model's native size."""
    from library import __version__

    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}")
    if resolution is None:
        side = 768 if v2 and v_parameterization else 512
        resolution = (side, side)
    meta = {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC,
        "modelspec.architecture": architecture(v2, v_parameterization, adapter),
        "modelspec.implementation": IMPL_DIFFUSERS if adapter == "lora" else IMPL_STABILITY_AI,
        "modelspec.implementation_version": f"sd-train/{__version__}",
        "modelspec.title": title or f"{ADAPTERS[adapter]}@{int(timestamp)}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }
    if clip_skip is not None:
        meta["modelspec.encoder_layer"] = str(clip_skip)
    for field in USER_FIELDS:
        value = (user or {}).get(field)
        if value is not None:
            meta[f"modelspec.{field}"] = value
    return meta


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
    value = getattr(args, "metadata_thumbnail", None)
    if value and not value.startswith("data:") and not Path(value).is_file():
        return [f"--metadata_thumbnail {value}: no such file (give an image file or a data: URL)"]
    return []


def user_fields(args: argparse.Namespace) -> dict[str, str | None]:
    """The free-text ``modelspec`` fields from the ``--metadata_*`` options (None where not given); the
    thumbnail read into a data URL."""
    fields = {field: getattr(args, f"metadata_{field}", None) for field in USER_FIELDS}
    if fields["thumbnail"]:
        fields["thumbnail"] = thumbnail_data_url(fields["thumbnail"])
    return fields


def run_fields(args: argparse.Namespace, group: Any) -> dict[str, Any]:
    """What :func:`modelspec_metadata` takes from a run besides the model: title, the training resolution,
    ``--clip_skip`` and the ``--metadata_*`` fields."""
    return {"title": file_title(args), "resolution": training_resolution(group), "clip_skip": args.clip_skip,
            "user": user_fields(args)}


def checkpoint_metadata(configs: Any, fields: dict[str, Any], timestamp: float | None = None) -> dict[str, str]:
    """The ``modelspec.*`` header of a whole-model ``.safetensors`` checkpoint (architecture without an
    adapter, Stability AI's implementation) from the model's ``configs`` and :func:`run_fields`;
    ``timestamp`` (default now) gives the date."""
    import time

    return modelspec_metadata(v2=configs.v2, v_parameterization=configs.v_parameterization, adapter=None,
                              timestamp=time.time() if timestamp is None else timestamp, **fields)


def file_title(args: argparse.Namespace) -> str | None:
    """``--metadata_title``, else ``--output_name`` (None when neither is given)."""
    return getattr(args, "metadata_title", None) or getattr(args, "output_name", None)
