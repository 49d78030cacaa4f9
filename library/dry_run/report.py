"""``--dry_run``: say what a training run would do, without loading the model, and exit 0.

The report is built from the same code the run uses — the dataset group (image headers only), the step
plan, the real learning-rate scheduler on a one-number optimizer, the dataset's own caption processing
for the first batches of epoch 1, the trainer's file names — plus a memory estimate from the model's
configs on the meta device (:mod:`library.dry_run.estimate`). Sections: datasets and buckets,
regularization images, steps, learning rate, sample captions, output files, memory. docs/dry_run.md.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from library.errors import UserError
from library.config.caption_options import caption_settings
from library.dry_run.plan import DryRunPlan
from library.option_groups import OptimizerOptions, Options, TextEncoderCacheOptions, TrainingOptions

logger = logging.getLogger(__name__)

LR_POINTS = (0.0, 0.10, 0.25, 0.50, 0.75, 1.0)
SAMPLE_CAPTIONS = 6
TOP_ACTIVATION_BUCKETS = 3
GIB = 2 ** 30


# ---- sections (each returns JSON-ready data) ----------------------------------------------------------

def _batch_sizes(samples: int, batch: int) -> list[int]:
    full, rest = divmod(samples, batch)
    return [batch] * full + ([rest] if rest else [])


def dataset_section(group: Any) -> list[dict]:
    """Per dataset: its buckets with images (with and without repeats) and batch sizes, and warnings for
    buckets smaller than the batch size (they always train as a partial batch)."""
    out = []
    for index, ds in enumerate(group.datasets):
        batch = ds.blueprint.batch_size
        buckets = []
        warnings = []
        for reso, items in ds.buckets.items():
            distinct = sorted(set(items))
            reg = sum(1 for i in distinct if ds.entries[i].is_reg)
            sizes = _batch_sizes(len(items), batch)
            buckets.append({"resolution": list(reso), "images": len(distinct), "train_images": len(distinct) - reg,
                            "reg_images": reg, "samples": len(items), "batches": len(sizes), "batch_sizes": sizes})
            if len(items) < batch:
                warnings.append(f"bucket {reso[0]}x{reso[1]} has {len(items)} sample(s) per epoch, fewer than the batch "
                                f"size {batch}: it always trains as a partial batch of {len(items)}"
                                + (" (batch 1)" if len(items) == 1 else ""))
        samples = ds.num_samples
        batches = ds.batch_count()
        out.append({"index": index, "batch_size": batch, "images": len(ds.entries),
                    "train_images": sum(1 for e in ds.entries if not e.is_reg),
                    "reg_images": sum(1 for e in ds.entries if e.is_reg), "samples_per_epoch": samples,
                    "batches_per_epoch": batches, "mean_batch_size": samples / batches if batches else 0.0,
                    "bucketing": ds.settings.enable_bucket, "buckets": buckets, "warnings": warnings,
                    "caption_settings": [caption_settings(sub) for sub in ds.blueprint.subsets]})
    return out


def regularization_section(group: Any) -> list[dict]:
    """For every dataset with regularization subsets: found and used reg images, their repeats as the
    loader balances them against the training samples, and the sample ratio."""
    from library.data.images import list_images

    out = []
    for index, ds in enumerate(group.datasets):
        reg_subsets = [s for s in ds.blueprint.subsets if s.is_reg and not s.is_finetuning]
        if not reg_subsets:
            continue
        found = sum(len(list_images(s.image_dir)) for s in reg_subsets if s.image_dir and Path(s.image_dir).is_dir())
        train = [e for e in ds.entries if not e.is_reg]
        reg = [e for e in ds.entries if e.is_reg]
        train_samples = sum(e.num_repeats for e in train)
        reg_samples = sum(e.num_repeats for e in reg)
        out.append({"dataset": index, "train_images": len(train), "train_samples": train_samples,
                    "reg_found": found, "reg_used": len(reg), "reg_unused": max(0, found - len(reg)),
                    "reg_samples": reg_samples, "subset_repeats": sorted({s.num_repeats for s in reg_subsets}),
                    "repeats_used": dict(sorted(Counter(e.num_repeats for e in reg).items(), reverse=True)),
                    "ratio": reg_samples / train_samples if train_samples else 0.0,
                    "prior_loss_weight": ds.blueprint.prior_loss_weight})
    return out


def steps_section(plan: Any, group: Any, training: TrainingOptions) -> dict:
    """The step arithmetic of :func:`library.training.plan.make_plan` (reads --max_train_epochs)."""
    last = plan.max_train_steps - (plan.num_epochs - 1) * plan.steps_per_epoch
    samples = sum(ds.num_samples for ds in group.datasets)
    batch = max(ds.blueprint.batch_size for ds in group.datasets)  # the datasets' own (TOML) batch sizes
    per_step = plan.num_processes * plan.gradient_accumulation_steps
    return {"batches_per_epoch": len(group), "processes": plan.num_processes,
            "batches_per_process": plan.batches_per_epoch, "gradient_accumulation_steps": plan.gradient_accumulation_steps,
            "steps_per_epoch": plan.steps_per_epoch, "epochs": plan.num_epochs, "last_epoch_steps": last,
            "max_train_steps": plan.max_train_steps, "from_epochs": bool(training.max_train_epochs),
            "batch_size": batch, "total_batch_size": batch * per_step,
            "mean_samples_per_step": samples / len(group) * per_step if len(group) else 0.0,
            "samples_per_epoch": samples}


def lr_section(optimizer: OptimizerOptions, plan: Any, groups: list[tuple[str, float | None]]) -> dict:
    """Learning rates at 0, 10, 25, 50, 75 and 100 % of the run, from the real scheduler code on a
    throwaway one-number optimizer. Step k is the lr of the (k+1)-th optimizer step; 100 % is the last step.
    Reads the optimizer and learning-rate options."""
    from library.training.lr import lr_at_steps, resolve_steps
    from library.training.lr_options import schedule_options
    from library.training.optim import parse_optimizer_args, resolve_optimizer_name

    optimizer_name = resolve_optimizer_name(optimizer.optimizer_type, use_8bit_adam=optimizer.use_8bit_adam,
                                            use_lion_optimizer=optimizer.use_lion_optimizer)
    name, notes = optimizer.lr_scheduler, []
    group_lrs = [lr if lr is not None else optimizer.learning_rate for _, lr in groups]
    relative_step = parse_optimizer_args(optimizer.optimizer_args).get("relative_step", True)
    if optimizer_name.lower() == "adafactor" and relative_step:
        name = f"adafactor:{optimizer.learning_rate}"
        group_lrs = None
        notes.append("AdaFactor relative_step: the optimizer computes its own lr; the schedule's initial lr is shown")
    if optimizer_name.lower().startswith(("dadapt", "prodigy")):
        notes.append(f"{optimizer_name}: the lr is a multiplier of the adapted step size")
    if plan.num_processes > 1:  # as kohya: no automatic scaling with the global batch
        notes.append(f"{plan.num_processes} processes: the learning rate is used as given, not scaled with the "
                     f"{plan.num_processes}x larger global batch")
    total = plan.max_train_steps
    steps = [min(total - 1, int(p * total)) for p in LR_POINTS]
    values = lr_at_steps(name, steps, learning_rate=optimizer.learning_rate, max_train_steps=total, group_lrs=group_lrs,
                         **schedule_options(optimizer))
    names = [n for n, _ in groups] if group_lrs else ["lr"]
    return {"scheduler": optimizer.lr_scheduler_type or name,
            "warmup_steps": resolve_steps(optimizer.lr_warmup_steps, total),
            "optimizer": optimizer_name, "groups": names, "notes": notes,
            "points": [{"percent": round(p * 100), "step": s, "lrs": dict(zip(names, v))}
                       for p, s, v in zip(LR_POINTS, steps, values)]}


def caption_section(group: Any, plan: Any, tokenizer: Any, max_token_length: int | None) -> list[dict]:
    """The first captions of epoch 1 exactly as training draws them (this process's first batches, built by
    the dataset itself: dropout, shuffle, keep_tokens, token warm-up, Textual Inversion expansion)."""
    from library.training.epoch_loader import process_share

    share = process_share(group.epoch_batches(1), 0, plan.num_processes)
    limit = max_token_length or 75
    out = []
    for index, (position, spec, _padding) in enumerate(share):
        if len(out) >= SAMPLE_CAPTIONS:
            break
        batch = group.load_batch(spec, 1, position, step=index // plan.gradient_accumulation_steps)
        if batch is None:
            continue
        for key, caption in zip(batch["keys"], batch["captions"]):
            tokens = len(tokenizer(caption, add_special_tokens=False).input_ids) if tokenizer is not None else None
            out.append({"key": str(key), "bucket": list(spec.bucket), "caption": caption, "tokens": tokens,
                        "truncated": tokens is not None and tokens > limit})
    return out[:SAMPLE_CAPTIONS]


def activation_buckets(group: Any) -> list[tuple[tuple[int, int], int]]:
    """The bucket resolutions with the most pixels per batch (the memory peak), at their largest batch."""
    candidates = {}
    for ds in group.datasets:
        for reso, items in ds.buckets.items():
            batch = min(ds.blueprint.batch_size, len(items))
            candidates[(tuple(reso), batch)] = reso[0] * reso[1] * batch
    ranked = sorted(candidates, key=lambda k: (-candidates[k], k))
    return ranked[:TOP_ACTIVATION_BUCKETS]


def memory_section(estimate: Any) -> dict:
    """The estimate as JSON-ready data (bytes)."""
    return {"device": estimate.device.name, "device_total_bytes": estimate.device.total_bytes,
            "precision": estimate.precision, "model_source": estimate.model_source,
            "parameters": estimate.components,
            "lines": [{"label": line.label, "count": line.count, "dtype": line.dtype, "bytes": line.bytes,
                       "note": line.note} for line in estimate.lines],
            "activations": [{"resolution": list(r.resolution), "batch": r.batch,
                             "without_checkpointing": r.without_checkpointing,
                             "with_checkpointing": r.with_checkpointing, "vae_encode": r.vae_transient,
                             "step_peak": estimate.activation_bytes(r)} for r in estimate.activations],
            "gradient_checkpointing": estimate.gradient_checkpointing, "overhead_bytes": estimate.overhead,
            "cache_phase_bytes": estimate.cache_phase, "static_bytes": estimate.static_bytes,
            "peak_bytes": estimate.peak_bytes, "notes": estimate.notes}


# ---- the run -----------------------------------------------------------------------------------------------

def text_encoder_outputs_mode(te_cache: TextEncoderCacheOptions, text_encoder_use: Any,
                              conflicts: Sequence[str]) -> str:
    """How the steps get their text conditioning (docs/te_cache.md), in words: from the cache options,
    ``text_encoder_use`` (the method's :class:`library.training.te_cache.TextEncoderUse`) and the options that
    change captions between steps (:func:`library.training.te_cache.caption_conflicts`)."""
    from library.training.te_cache import automatic_reuse

    if te_cache.cache_text_encoder_outputs_to_disk:
        return "cached before training, in memory and in <image>_te_outputs.npz files"
    if te_cache.requested:
        return "cached before training, in memory"
    if automatic_reuse(te_cache, text_encoder_use, conflicts):
        when = (f" once the text encoder stops training at step {text_encoder_use.steps}"
                if text_encoder_use.stops_later else "")
        return (f"reused per caption after its first encoding{when} (automatic; --no_cache_text_encoder_outputs "
                "turns it off)")
    return "encoded at every step"


def build_report(opts: Options, plan: DryRunPlan, *, output_name: str | None, text_encoder_use: Any,
                 support_dreambooth: bool, support_finetuning: bool, configure_group: Any = None) -> dict:
    """Everything the dry run reports, as JSON-ready data. Reads image headers, the dataset config and
    the model's header / configs; loads no weights and encodes nothing. ``plan`` is the method's part
    (:mod:`library.dry_run.plan`); ``output_name`` the stem of the saves (``--output_name`` or the method's
    default); ``text_encoder_use`` the method's text-encoder use (library.methods.base.MethodStart);
    ``configure_group(group)`` is the script's own dataset hook (Textual Inversion's caption
    replacements), as for ``session.prepare_run``."""
    from library.dry_run import memory as mem
    from library.dry_run.estimate import estimate_memory
    from library.dry_run.plan import Precision
    from library.training import session
    from library.training.hub_resume import resume_folder
    from library.training.save_plan import plan_outputs
    from library.training.plan import make_plan
    from library.training.prompts import read_prompt_file
    from library.training.te_cache import caption_conflicts
    if not opts.save.output_dir:
        raise UserError("--output_dir is required (where trained files are written)")
    processes = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    seed = session.choose_seed(opts.training.seed, resume_folder(opts.save, opts.hub))
    tokenizer = session.tokenizer_for(opts.model)
    if plan.prepare_tokenizer is not None:
        plan.prepare_tokenizer(tokenizer)  # Textual Inversion's new tokens
    _blueprint, group = session.load_datasets(opts.data, opts.validation, tokenizer, seed, given=opts.given,
                                              support_dreambooth=support_dreambooth,
                                              support_finetuning=support_finetuning)
    if configure_group is not None:
        configure_group(group)
    run_plan = make_plan(len(group), num_processes=processes,
                         gradient_accumulation_steps=opts.training.gradient_accumulation_steps,
                         batch_size=opts.data.train_batch_size, max_train_steps=opts.training.max_train_steps,
                         max_train_epochs=opts.training.max_train_epochs)
    group.set_max_train_steps(run_plan.max_train_steps)

    meta = mem.build_meta_model(opts.model)
    precision = Precision.from_training(opts.training)
    trainable = plan.trainable(meta, precision)
    prompts = len(read_prompt_file(opts.sample.sample_prompts)) if opts.sample.sample_prompts else 0
    outputs = plan_outputs(opts, run_plan, plan.layout.file_name, output_name=output_name, sample_prompts=prompts)
    validation = getattr(group, "validation", None)
    report = {
        "method": plan.method, "method_name": plan.title,
        "model": {"path": str(opts.model.pretrained_model_name_or_path), "v2": bool(meta.configs.v2),
                  "configs_from": meta.source},
        "seed": seed, "seed_given": opts.training.seed is not None,
        "datasets": dataset_section(group),
        "validation_images": validation.num_images if validation is not None else 0,
        "regularization": regularization_section(group),
        "steps": steps_section(run_plan, group, opts.training),
        "learning_rate": lr_section(opts.optimizer, run_plan, trainable.groups),
        "trainable": {"parameters": trainable.count, "parts": trainable.parts},
        "captions": caption_section(group, run_plan, tokenizer, opts.data.max_token_length),
        "text_encoder_outputs": text_encoder_outputs_mode(
            opts.te_cache, text_encoder_use, caption_conflicts(group, opts.data, opts.dreambooth)),
        "outputs": outputs.to_json(),
    }
    estimate = estimate_memory(meta, trainable, activation_buckets(group), precision=precision, model=opts.model,
                               data=opts.data, optimizer=opts.optimizer, ema=opts.ema,
                               text_encoder_cached=opts.te_cache.requested,
                               vae_in_step=not opts.data.latents_cached and not group.precomputed_ok,
                               device=mem.training_device())
    report["memory"] = memory_section(estimate)
    report["warnings"] = _warnings(report)
    return report


def _warnings(report: dict) -> list[str]:
    warnings = [w for ds in report["datasets"] for w in ds["warnings"]]
    for cap in report["captions"]:
        if cap["truncated"]:
            warnings.append(f"the caption of {cap['key']} has {cap['tokens']} tokens and is cut at the token limit")
    out = report["outputs"]
    for save in out["saves"]:
        if save["exists"]:
            warnings.append(f"{Path(out['output_dir']) / save['name']} exists and would be replaced ({save['point']})")
    for name in out["deleted_existing"]:
        warnings.append(f"{Path(out['output_dir']) / name} exists and would be deleted by --save_last_n_*")
    memory = report["memory"]
    if memory["device_total_bytes"] and memory["peak_bytes"] > memory["device_total_bytes"]:
        warnings.append(f"the estimated peak ({memory['peak_bytes'] / GIB:.1f} GiB) exceeds the memory of "
                        f"{memory['device']} ({memory['device_total_bytes'] / GIB:.1f} GiB)")
    return warnings


RUN_INPUT_OPTIONS = ("pretrained_model_name_or_path", "dataset_config", "in_json", "sample_prompts", "network_weights")


def _check_json_target(json_path: str | None, inputs: dict[str, Any]) -> None:
    """``--dry_run_json`` must not name one of the run's ``inputs`` (option name -> path; it would be
    overwritten)."""
    if not json_path:
        return
    target = Path(json_path).resolve()
    for option, value in inputs.items():
        if value and Path(str(value)).resolve() == target:
            raise UserError(f"--dry_run_json {json_path} is the --{option} file; give another path")


def run_dry_run(opts: Options, plan: DryRunPlan, *, output_name: str | None, text_encoder_use: Any,
                support_dreambooth: bool, support_finetuning: bool, configure_group: Any = None) -> int:
    """Build the report, print it (main process only), write ``--dry_run_json`` if asked; returns 0.

    ``plan`` is the method's part, from its module's ``dry_run_plan(...)`` (library/methods/network.py,
    full_model.py, textual_inversion.py, xti.py); the rest as for :func:`build_report`."""
    from library.dry_run.text import render_report

    if int(os.environ.get("RANK", "0") or 0) != 0:
        return 0
    _check_json_target(opts.dry_run.dry_run_json, {name: opts.option(name) for name in RUN_INPUT_OPTIONS})
    report = build_report(opts, plan, output_name=output_name, text_encoder_use=text_encoder_use,
                          support_dreambooth=support_dreambooth,
                          support_finetuning=support_finetuning, configure_group=configure_group)
    print(render_report(report))
    if opts.dry_run.dry_run_json:
        from library.fileio import atomic_write_text

        atomic_write_text(opts.dry_run.dry_run_json, json.dumps(report, indent=2) + "\n")
        print(f"wrote the report to {opts.dry_run.dry_run_json}")
    return 0
