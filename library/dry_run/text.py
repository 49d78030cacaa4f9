"""The text form of the ``--dry_run`` report (the data comes from :func:`library.dry_run.report.build_report`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

GIB = 2 ** 30
MIB = 2 ** 20
MAX_LISTED_SAVES = 12


def _size(n: int | None) -> str:
    """Bytes as GiB (MiB below 0.1 GiB)."""
    if n is None:
        return ""
    return f"{n / GIB:.2f} GiB" if n >= 0.1 * GIB else f"{n / MIB:.1f} MiB"


def _count(n: int | None) -> str:
    return "" if n is None else f"{n:,}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "    ",
          right: Sequence[int] = ()) -> list[str]:
    """Aligned columns; column indexes in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append((indent + "  ".join(parts)).rstrip())
    return lines


def _datasets(report: dict) -> list[str]:
    lines = ["Datasets and buckets"]
    for ds in report["datasets"]:
        lines.append(f"  [dataset {ds['index']}] {ds['images']} image(s) ({ds['train_images']} train, {ds['reg_images']} "
                     f"reg), {ds['samples_per_epoch']} sample(s) per epoch with repeats, batch size {ds['batch_size']}, "
                     f"{ds['batches_per_epoch']} batch(es), mean effective batch {ds['mean_batch_size']:.2f}"
                     + ("" if ds["bucketing"] else " (no bucketing)"))
        rows = [(f"{b['resolution'][0]}x{b['resolution'][1]}", b["images"], b["train_images"], b["reg_images"],
                 b["samples"], b["batches"], " + ".join(f"{s}x{c}" for s, c in
                                                       sorted(Counter(b["batch_sizes"]).items(), reverse=True)))
                for b in ds["buckets"]]
        lines += table(("bucket", "images", "train", "reg", "samples", "batches", "batch sizes"), rows,
                       right=(1, 2, 3, 4, 5))
        for j, settings in enumerate(ds.get("caption_settings", [])):
            if settings:
                shown = ", ".join(k if v is True else f"{k} {v!r}" for k, v in settings.items())
                lines.append(f"    subset {j} captions: {shown}")
        lines += [f"  WARNING: {w}" for w in ds["warnings"]]
    if report.get("validation_images"):
        lines.append(f"  validation: {report['validation_images']} image(s) held out (not trained)")
    return lines


def _regularization(report: dict) -> list[str]:
    if not report["regularization"]:
        return []
    lines = ["Regularization images"]
    for reg in report["regularization"]:
        lines.append(f"  [dataset {reg['dataset']}] train: {reg['train_images']} image(s), {reg['train_samples']} "
                     f"sample(s) with repeats; reg: {reg['reg_found']} found, {reg['reg_used']} used, "
                     f"{reg['reg_unused']} never used")
        if reg["reg_used"]:
            repeats = ", ".join(f"{r} ({n} image{'s' if n != 1 else ''})" for r, n in reg["repeats_used"].items())
            lines.append(f"    repeats per reg image as the loader balances them (taken in name order): {repeats} "
                         f"-> {reg['reg_samples']} reg sample(s)")
        lines.append(f"    reg : train samples = {reg['reg_samples']} : {reg['train_samples']} ({reg['ratio']:.2f}); "
                     f"prior_loss_weight {reg['prior_loss_weight']:g}")
    return lines


def _steps(report: dict) -> list[str]:
    s = report["steps"]
    last = "" if s["last_epoch_steps"] == s["steps_per_epoch"] else \
        f" (the last one runs {s['last_epoch_steps']} of {s['steps_per_epoch']} steps)"
    rows = [("batches per epoch (all processes)", s["batches_per_epoch"]),
            ("processes", s["processes"]),
            ("batches per process and epoch", s["batches_per_process"]),
            ("gradient accumulation steps", s["gradient_accumulation_steps"]),
            ("optimizer steps per epoch", s["steps_per_epoch"]),
            ("epochs", f"{s['epochs']}{last}"),
            ("optimizer steps in total", f"{s['max_train_steps']}"
             + (" (from --max_train_epochs)" if s["from_epochs"] else "")),
            ("samples per optimizer step", f"{s['total_batch_size']} (batch {s['batch_size']} x {s['processes']} "
                                           f"process(es) x accumulation {s['gradient_accumulation_steps']}); "
                                           f"{s['mean_samples_per_step']:.2f} on average with partial batches"),
            ("samples per epoch (repeats included)", s["samples_per_epoch"])]
    return ["Steps"] + table(("", ""), rows, indent="  ")[1:]


def _learning_rate(report: dict) -> list[str]:
    lr = report["learning_rate"]
    lines = [f"Learning rate ({lr['scheduler']}, warm-up {lr['warmup_steps']} step(s), optimizer {lr['optimizer']})"]
    rows = [(f"{p['percent']}%", p["step"], *(f"{p['lrs'][g]:.4e}" for g in lr["groups"])) for p in lr["points"]]
    lines += table(("point", "step", *lr["groups"]), rows, right=tuple(range(2 + len(lr["groups"]))))
    lines.append("    (step k: the lr of the (k+1)-th optimizer step; 100% is the last step)")
    lines += [f"    note: {n}" for n in lr["notes"]]
    return lines


def _captions(report: dict) -> list[str]:
    exact = "exact for this seed" if report["seed_given"] else \
        f"random seed {report['seed']}: pass --seed {report['seed']} to train exactly these"
    lines = [f"Sample captions (first batches of epoch 1 as trained; {exact})"]
    for cap in report["captions"]:
        text = f'"{cap["caption"]}"' if cap["caption"] else "(empty: caption dropped)"
        tokens = "" if cap["tokens"] is None else f" ({cap['tokens']} token{'' if cap['tokens'] == 1 else 's'}{', CUT' if cap['truncated'] else ''})"
        where = "/".join(Path(cap["key"]).parts[-2:])
        lines.append(f"  [{cap['bucket'][0]}x{cap['bucket'][1]}] {where}: {text}{tokens}")
    return lines


def _outputs(report: dict) -> list[str]:
    out = report["outputs"]
    lines = [f"Files written in {out['output_dir']}"]
    saves = out["saves"]
    listed = saves if len(saves) <= MAX_LISTED_SAVES else saves[:MAX_LISTED_SAVES // 2] + saves[-MAX_LISTED_SAVES // 2:]
    rows = []
    for save in listed:
        status = ("kept" if save["kept"] else "deleted later (--save_last_n_*)") + (", REPLACES an existing file"
                                                                                     if save["exists"] else "")
        rows.append((save["kind"], save["point"], save["name"], status))
    lines += table(("save", "at", "name", "status"), rows)
    if len(saves) > len(listed):
        lines.append(f"    ... {len(saves) - len(listed)} more save(s) not listed")
    kept = sum(1 for s in saves if s["kept"])
    lines.append(f"    {len(saves)} save(s) written, {kept} left at the end")
    samples = out["samples"]
    if samples["dir"]:
        points = samples["points"]
        shown = ", ".join(points[:4]) + (f", ... ({len(points)} in all)" if len(points) > 4 else "")
        lines.append(f"  samples: {samples['dir']} {samples['prompts']} prompt(s) x {len(points)} point(s) = "
                     f"{samples['files']} PNG file(s) named {samples['pattern']}; at {shown or 'no point'}")
    if out["log_dir"]:
        lines.append(f"  logs: {out['log_dir']} (a new folder per run)")
    return lines


def _memory(report: dict) -> list[str]:
    m = report["memory"]
    total = f", {m['device_total_bytes'] / GIB:.1f} GiB" if m["device_total_bytes"] else ""
    lines = [f"Memory estimate on {m['device']}{total}; mixed precision {m['precision']} "
             "(a rough estimate: see docs/dry_run.md)",
             f"  model architecture from {m['model_source']}"]
    p = m["parameters"]
    lines.append(f"  parameters: UNet {p['unet']:,}, text encoder {p['text_encoder']:,}, VAE {p['vae']:,}")
    trained = report["trainable"]
    parts = "; ".join(f"{k} {v:,}" for k, v in trained["parts"].items())
    lines.append(f"  trained: {trained['parameters']:,} ({parts})")
    rows = [(line["label"], _count(line["count"]), line["dtype"], _size(line["bytes"]), line["note"])
            for line in m["lines"]]
    lines += table(("item", "elements", "dtype", "size", ""), rows, right=(1, 3))
    gc = "on" if m["gradient_checkpointing"] else "off"
    lines.append(f"  activations saved for backward (gradient checkpointing {gc}); the step's peak is the larger "
                 "of them (+10%) and the VAE encoding")
    rows = [(f"{a['resolution'][0]}x{a['resolution'][1]}", a["batch"], _size(a["without_checkpointing"]),
             _size(a["with_checkpointing"]), _size(a["vae_encode"]) if a["vae_encode"] else "-", _size(a["step_peak"]))
            for a in m["activations"]]
    lines += table(("bucket", "batch", "without GC", "with GC", "VAE encode", "step peak"), rows,
                   right=(1, 2, 3, 4, 5))
    step = max((a["step_peak"] for a in m["activations"]), default=0)
    lines.append(f"  weights, gradients, optimizer: {m['static_bytes'] / GIB:.3f} GiB + step: {step / GIB:.3f} GiB"
                 + (f" + CUDA context: {m['overhead_bytes'] / GIB:.3f} GiB" if m["overhead_bytes"] else ""))
    if m["cache_phase_bytes"]:
        lines.append(f"  latent caching before training: {m['cache_phase_bytes'] / GIB:.3f} GiB")
    of = f" of {m['device_total_bytes'] / GIB:.1f} GiB" if m["device_total_bytes"] else ""
    lines.append(f"  ESTIMATED PEAK: {m['peak_bytes'] / GIB:.3f} GiB{of}")
    lines += [f"  note: {n}" for n in m["notes"]]
    return lines


def render_report(report: dict) -> str:
    """The whole report as aligned text sections."""
    model = report["model"]
    head = [f"=== dry run: {report['method_name']} — nothing is loaded or trained ===",
            f"model: {model['path']} (SD{'2' if model['v2'] else '1'}.x)",
            f"seed: {report['seed']}" + ("" if report["seed_given"] else " (random; pass --seed to fix it)"),
            f"text-encoder outputs: {report['text_encoder_outputs']}"]
    sections = [head, _datasets(report), _regularization(report), _steps(report), _learning_rate(report),
                _captions(report), _outputs(report), _memory(report)]
    if report["warnings"]:
        sections.append(["Warnings"] + [f"  WARNING: {w}" for w in report["warnings"]])
    return "\n\n".join("\n".join(s) for s in sections if s)
