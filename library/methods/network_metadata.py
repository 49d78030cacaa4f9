"""The ``ss_*`` training metadata written into a LoRA's safetensors header (kohya's keys and formats)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from library.config.arguments import parse_network_args
from library.modelspec import file_date
from library.option_groups import ModelOptions, NetworkOptions, Options, ValidationOptions
from library.training.loss_options import loss_metadata
from library.training.plan import RunPlan


def _legacy_file_hash(path: Path) -> str:
    """A1111's legacy model hash: SHA-256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _face_crop(value: Any) -> Any:
    """The parsed ``--face_crop_aug_range`` (a tuple), as the reference records it."""
    from library.config import parse_face_crop_option

    return parse_face_crop_option(value) if isinstance(value, str) else value


def _subset_name(subset: Any) -> str:
    return os.path.basename(os.path.normpath(subset.metadata_file or subset.image_dir or ""))


def tag_frequency(group: Any) -> dict[str, dict[str, int]]:
    """``{folder or metadata basename: {tag: count}}`` over every image's source caption (no repeats)."""
    freq: dict[str, Counter] = {}
    for ds in group.datasets:
        for entry in ds.entries:
            name = _subset_name(ds.blueprint.subsets[entry.subset_index])
            tags = [t.strip().lower() for t in entry.caption.split(",")]
            freq.setdefault(name, Counter()).update(t for t in tags if t)
    return {k: dict(v) for k, v in freq.items()}


def _dirs(group: Any, reg: bool) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for ds in group.datasets:
        for index, subset in enumerate(ds.blueprint.subsets):
            if subset.is_reg != reg:
                continue
            count = sum(1 for e in ds.entries if e.subset_index == index)
            name, n = _subset_name(subset), 2
            base = name
            while name in out:
                name, n = f"{base} ({n})", n + 1
            out[name] = {"n_repeats": subset.num_repeats, "img_count": count}
    return out


def _bucket_info(ds: Any) -> dict[str, Any] | None:
    if not ds.settings.enable_bucket:
        return None
    errors = [abs(a.ar_error) for a in ds.assignments]
    return {"buckets": {str(i): {"resolution": list(reso), "count": len(items)}
                        for i, (reso, items) in enumerate(ds.buckets.items())},
            "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}


def dataset_metadata(group: Any, blueprint: Any, plan: RunPlan, *, batch_size: int) -> dict[str, str]:
    """The dataset description: legacy keys without ``--dataset_config`` (``batch_size`` is
    ``--train_batch_size``), ``ss_datasets`` with it."""
    meta = {"ss_tag_frequency": json.dumps(tag_frequency(group)),
            "ss_dataset_dirs": json.dumps(_dirs(group, reg=False))}
    if blueprint.source is None:
        ds = group.datasets[0]
        bp = ds.blueprint
        sub = bp.subsets[0]
        meta.update({
            "ss_batch_size_per_device": str(batch_size), "ss_total_batch_size": str(plan.total_batch_size),
            "ss_resolution": str(bp.resolution), "ss_color_aug": str(sub.color_aug), "ss_flip_aug": str(sub.flip_aug),
            "ss_random_crop": str(sub.random_crop), "ss_shuffle_caption": str(sub.shuffle_caption),
            "ss_keep_tokens": str(sub.keep_tokens), "ss_enable_bucket": str(bp.enable_bucket),
            "ss_bucket_no_upscale": str(bp.bucket_no_upscale),
            "ss_min_bucket_reso": str(bp.min_bucket_reso if bp.enable_bucket else None),
            "ss_max_bucket_reso": str(bp.max_bucket_reso if bp.enable_bucket else None),
            "ss_reg_dataset_dirs": json.dumps(_dirs(group, reg=True)),
            "ss_bucket_info": json.dumps(_bucket_info(ds)),
        })
    else:
        datasets = []
        for ds in group.datasets:
            bp = ds.blueprint
            subsets = []
            for index, sub in enumerate(bp.subsets):
                item = {"img_count": sum(1 for e in ds.entries if e.subset_index == index),
                        "num_repeats": sub.num_repeats, "color_aug": sub.color_aug, "flip_aug": sub.flip_aug,
                        "random_crop": sub.random_crop, "shuffle_caption": sub.shuffle_caption,
                        "keep_tokens": sub.keep_tokens}
                item.update(keep_tokens_separator=sub.keep_tokens_separator,  # later caption keys, as upstream
                            secondary_separator=sub.secondary_separator, enable_wildcard=sub.enable_wildcard,
                            caption_prefix=sub.caption_prefix, caption_suffix=sub.caption_suffix)
                if sub.image_dir:
                    item["image_dir"] = os.path.basename(os.path.normpath(sub.image_dir))
                if sub.is_finetuning:
                    item["metadata_file"] = os.path.basename(sub.metadata_file)
                else:
                    item.update(class_tokens=sub.class_tokens, is_reg=sub.is_reg)
                subsets.append(item)
            datasets.append({
                "is_dreambooth": bp.is_dreambooth, "batch_size_per_device": bp.batch_size,
                "num_train_images": sum(e.num_repeats for e in ds.entries if not e.is_reg),
                "num_reg_images": sum(e.num_repeats for e in ds.entries if e.is_reg),
                "resolution": list(ds.settings.resolution), "enable_bucket": bp.enable_bucket,
                "min_bucket_reso": bp.min_bucket_reso, "max_bucket_reso": bp.max_bucket_reso,
                "tag_frequency": tag_frequency(group), "bucket_info": _bucket_info(ds), "subsets": subsets})
        meta["ss_datasets"] = json.dumps(datasets)
    return meta


def _validation_keys(validation: ValidationOptions, group: Any) -> dict[str, str]:
    """The ``ss_validation_*`` keys of the current reference: the validation options and the number of
    validation images of ``group`` (0 without a validation split)."""
    split = validation.validation_split
    images = group.validation.num_images if group.validation is not None else 0
    return {
        "ss_validation_split": str(split if split is not None else 0.0),
        "ss_validation_seed": str(validation.validation_seed),
        "ss_validate_every_n_steps": str(validation.validate_every_n_steps),
        "ss_validate_every_n_epochs": str(validation.validate_every_n_epochs),
        "ss_max_validation_steps": str(validation.max_validation_steps),
        "ss_num_validation_images": str(images),
    }


def minimal_metadata(network: NetworkOptions) -> dict[str, str]:
    """The keys written even with ``--no_metadata``: ``ss_network_module``, ``ss_network_dim``,
    ``ss_network_alpha`` and, with ``--network_args``, ``ss_network_args`` (the ``key=value`` pairs as
    :func:`library.config.arguments.parse_network_args` reads them for the network, as JSON)."""
    meta = {"ss_network_module": str(network.network_module), "ss_network_dim": str(network.network_dim),
            "ss_network_alpha": str(network.network_alpha)}
    if network.network_args:
        meta["ss_network_args"] = json.dumps(parse_network_args(network.network_args))
    return meta


def network_metadata(opts: Options, *, group: Any, blueprint: Any, plan: RunPlan, seed: int, session_id: int,
                     started_at: float, optimizer_name: str, v2: bool, v_parameterization: bool,
                     recorded_lrs: dict[str, str] | None = None) -> dict[str, str]:
    """The metadata fixed for the run (per-save keys are added by :func:`for_save`): the ``ss_*`` keys,
    ``ss_base_model_version`` and the ``modelspec.*`` header (docs/train_network.md, "File format"); only
    :func:`minimal_metadata` with ``--no_metadata``.

    It records the run's options, so it takes the bundle: it reads the ``network``, ``save``
    (``--output_name``), ``optimizer``, ``training``, ``model``, ``data``, ``loss``, ``validation`` and
    ``metadata`` groups. ``v2`` / ``v_parameterization`` are the loaded model's; ``recorded_lrs`` the
    learning rates as the optimizer got them (:func:`library.methods.network.recorded_learning_rates`)."""
    from library.modelspec import base_model_version, run_fields

    network, model, data, loss = opts.network, opts.model, opts.data, opts.loss
    minimal = minimal_metadata(network)
    if network.no_metadata:
        return minimal
    n_train = sum(e.num_repeats for ds in group.datasets for e in ds.entries if not e.is_reg)
    n_reg = sum(ds.blueprint.subsets[e.subset_index].num_repeats for ds in group.datasets for e in ds.entries
                if e.is_reg)
    meta = {
        "ss_session_id": str(session_id), "ss_training_started_at": str(started_at),
        "ss_output_name": str(opts.save.output_name), "ss_learning_rate": str(opts.optimizer.learning_rate),
        "ss_text_encoder_lr": str(network.text_encoder_lr), "ss_unet_lr": str(network.unet_lr),
        "ss_num_train_images": str(n_train), "ss_num_reg_images": str(n_reg),
        "ss_num_batches_per_epoch": str(plan.batches_per_epoch), "ss_num_epochs": str(plan.num_epochs),
        "ss_max_train_steps": str(plan.max_train_steps),
        "ss_gradient_checkpointing": str(model.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(opts.training.gradient_accumulation_steps),
        "ss_lr_warmup_steps": str(opts.optimizer.lr_warmup_steps), "ss_lr_scheduler": str(opts.optimizer.lr_scheduler),
        "ss_mixed_precision": str(opts.training.mixed_precision), "ss_full_fp16": str(opts.training.full_fp16),
        "ss_v2": str(v2), "ss_clip_skip": str(model.clip_skip), "ss_max_token_length": str(data.max_token_length),
        "ss_cache_latents": str(data.latents_cached), "ss_seed": str(seed), "ss_lowram": str(model.lowram),
        "ss_noise_offset": str(loss.noise_offset), "ss_multires_noise_iterations": str(loss.multires_noise_iterations),
        "ss_multires_noise_discount": str(loss.multires_noise_discount), "ss_min_snr_gamma": str(loss.min_snr_gamma),
        "ss_prior_loss_weight": str(data.prior_loss_weight), "ss_max_grad_norm": str(opts.optimizer.max_grad_norm),
        "ss_caption_dropout_rate": str(data.caption_dropout_rate),
        "ss_caption_dropout_every_n_epochs": str(data.caption_dropout_every_n_epochs),
        "ss_caption_tag_dropout_rate": str(data.caption_tag_dropout_rate),
        "ss_face_crop_aug_range": str(_face_crop(data.face_crop_aug_range)),
        "ss_training_comment": str(network.training_comment),
        "ss_sd_scripts_commit_hash": "(unknown)", "ss_optimizer": optimizer_name,
    }
    meta.update(loss_metadata(loss))  # loss / noise options (library/training/loss_options.py)
    # keys the current reference writes beyond the 2023 set
    meta.update({"ss_adaptive_noise_scale": str(loss.adaptive_noise_scale),
                 "ss_network_dropout": str(network.network_dropout)})
    meta.update(_validation_keys(opts.validation, group))
    meta.update({"ss_fp8_base": str(model.fp8_base), "ss_fp8_base_unet": str(model.fp8_base_unet),
                 "ss_noise_offset_random_strength": str(loss.noise_offset_random_strength),
                 "ss_resize_interpolation": str(data.resize_interpolation),
                 "ss_scale_weight_norms": str(network.scale_weight_norms)})
    meta["ss_base_model_version"] = base_model_version(v2, v_parameterization)
    fields = run_fields(opts.metadata, output_name=opts.save.output_name, clip_skip=model.clip_skip, group=group)
    meta.update(fields.header(v2=v2, v_parameterization=v_parameterization, adapter="lora", timestamp=started_at))
    meta.update(recorded_lrs or {})
    meta.update(minimal)
    meta.update(dataset_metadata(group, blueprint, plan, batch_size=data.train_batch_size))
    return meta


def cached_file_hashes(path: Path) -> tuple[str, str]:
    """``(legacy A1111 hash, SHA-256)`` of a model file, remembered in the toolkit's cache folder by path,
    size and modification time, so a multi-GB checkpoint is hashed once, not at every run."""
    from library.data.size_index import cache_root

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    store = cache_root() / "file_hashes.json"
    try:
        known = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key in known:
        return tuple(known[key])  # type: ignore[return-value]
    hashes = (_legacy_file_hash(path), _file_sha256(path))
    known[key] = list(hashes)
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f".{store.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known), encoding="utf-8")
        os.replace(tmp, store)
    except OSError:
        pass
    return hashes


def model_hash_jobs(model: ModelOptions) -> dict[str, Any]:
    """Names and (deferred) hashes of the base model and VAE files (``--pretrained_model_name_or_path``,
    ``--vae`` of ``model``).

    Hashing a multi-GB file must not run beside the training steps (a busy core stalls every parallel
    torch operation on a small machine), so the hashes are computed at the first save and cached."""
    jobs: dict[str, Any] = {}
    for option, prefix in ((model.pretrained_model_name_or_path, "sd_model"), (model.vae, "vae")):
        if not option:
            continue
        path = Path(option)
        jobs[f"ss_{prefix}_name"] = path.name if path.exists() else str(option)
        if path.is_file():
            jobs[f"ss_{prefix}_hash"] = lambda p=path: cached_file_hashes(p)[0]
            jobs[f"ss_new_{prefix}_hash"] = lambda p=path: cached_file_hashes(p)[1]
    return jobs


class RunMetadata:
    """The run's metadata plus per-save keys; deferred values are computed at the first save."""

    def __init__(self, base: dict[str, str], jobs: dict[str, Any], minimal: bool):
        """``jobs`` maps keys to strings or zero-argument callables returning strings."""
        self.base, self.jobs, self.minimal = base, jobs, minimal

    def __call__(self, epoch: int, step: int, final: bool) -> dict[str, str]:
        """The header for one save."""
        meta = dict(self.base)
        if self.minimal:
            return meta
        for key, value in list(self.jobs.items()):
            if callable(value):
                value = self.jobs[key] = value()
            meta[key] = value
        return for_save(meta, epoch=epoch, step=step)


def for_save(base: dict[str, str], *, epoch: int, step: int) -> dict[str, str]:
    """The header for one save: the run's metadata plus epoch, step, finish time (and the modelspec date)."""
    now = time.time()
    meta = dict(base, ss_training_finished_at=str(now), ss_epoch=str(epoch), ss_steps=str(step))
    if "modelspec.date" in meta:
        meta["modelspec.date"] = file_date(now)
    return meta
