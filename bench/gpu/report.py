"""Figures from the raw measurements of a case, and the Markdown report of a results json.

Every figure is derived here from what bench/gpu/child.py recorded, so a report can be rendered again
from a results file alone (``gpu_bench.py --render results.json``).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

GIB = 2**30
VRAM_TARGET_GIB = 6.0
ZERO3_TARGET_GIB = 12.0  # issue 16: SD1.5 full fine-tuning at 512 px, batch 4, bf16, ZeRO-3 + offload
MFU_TARGET = 0.35
KOHYA_RATIO_TARGET = 0.8
FLAT_TOLERANCE = 0.02  # sampling rounds' peaks within 2 % (or 64 MiB) of each other count as flat
FLAT_SLACK_BYTES = 64 * 2**20


def loss_check(losses: list[float]) -> dict[str, Any]:
    """Whether every loss is finite and whether the run's last third averages below its first third."""
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    out: dict[str, Any] = {"finite": finite, "first": losses[0] if losses else None,
                           "last": losses[-1] if losses else None, "decreasing": None}
    if finite and len(losses) >= 3:
        third = max(1, len(losses) // 3)
        head, tail = statistics.fmean(losses[:third]), statistics.fmean(losses[-third:])
        out.update(first_third_mean=head, last_third_mean=tail, decreasing=tail < head)
    return out


def step_figures(raw: dict[str, Any], *, batch_size: int, warmup: int) -> dict[str, Any]:
    """Median seconds per step after ``warmup`` steps, images/s and peak memory of one training run."""
    times = raw.get("step_seconds") or []
    timed = times[warmup:] if len(times) > warmup else times[-1:]
    out: dict[str, Any] = {"steps": len(times), "timed_steps": len(timed)}
    if timed:
        s = statistics.median(timed)
        out.update(s_per_step=s, img_per_s=batch_size / s if s > 0 else None)
    allocated = max(raw.get("step_peak_allocated") or [0])
    reserved = max(raw.get("step_peak_reserved") or [0])
    out.update(peak_vram_gib=allocated / GIB if allocated else None,
               peak_reserved_gib=reserved / GIB if reserved else None,
               peak_rss_gib=(raw.get("peak_rss") or 0) / GIB, loss=loss_check(raw.get("losses") or []))
    return out


def mfu(img_per_s: float | None, *, flops_per_image: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: useful FLOP/s (images/s x FLOP per image forward + backward) / peak
    (None without a peak, as on the CPU)."""
    if not img_per_s or not peak_tflops:
        return None
    return img_per_s * flops_per_image / (peak_tflops * 1e12)


def sampling_figures(raw: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of each sampling round, and whether it stays flat from round to round."""
    rounds = raw.get("sampling_rounds") or []
    peaks = [r["peak_allocated"] for r in rounds]
    out: dict[str, Any] = {"rounds": len(rounds), "round_seconds": [r["seconds"] for r in rounds],
                           "round_peak_gib": [p / GIB if p else None for p in peaks], "flat": None}
    if len(peaks) >= 2 and max(peaks) > 0:
        spread = max(peaks) - min(peaks)
        out["flat"] = spread <= max(FLAT_SLACK_BYTES, FLAT_TOLERANCE * max(peaks))
        out["spread_mib"] = spread / 2**20
    return out


def latent_figures(raw: dict[str, Any]) -> dict[str, Any]:
    """Images encoded per second by the latent cache (decoding, resizing and the VAE together)."""
    stats = raw.get("latents") or {}
    encoded, seconds = stats.get("encoded") or 0, stats.get("total_seconds") or 0.0
    return {"images": encoded, "seconds": seconds, "img_per_s": encoded / seconds if seconds else None,
            "vae_seconds": stats.get("vae_seconds"), "wait_seconds": stats.get("wait_seconds"),
            "vae_batch_size": stats.get("batch_size"), "workers": stats.get("workers")}


def case_metrics(case: dict[str, Any], raws: dict[str, dict[str, Any]], *, batch_size: int, warmup: int,
                 flops_per_image: float, peak_tflops: float | None, max_abs_diff: float | None = None) -> dict[str, Any]:
    """All figures of one case from its runs' raw results (keyed by run label)."""
    kind = case["kind"]
    batch = case.get("batch_size") or batch_size
    if kind == "resume":
        straight = raws.get("straight") or {}
        return {"max_abs_diff": max_abs_diff, "exact": max_abs_diff == 0.0 if max_abs_diff is not None else None,
                "loss": loss_check((straight.get("losses") or [])), "deterministic": case.get("deterministic")}
    raw = raws.get("train") or {}
    if kind == "latents":
        return latent_figures(raw)
    out = step_figures(raw, batch_size=batch, warmup=warmup)
    if kind == "ft":
        out["mfu"] = mfu(out.get("img_per_s"), flops_per_image=flops_per_image, peak_tflops=peak_tflops)
    if kind == "sampling":
        out["sampling"] = sampling_figures(raw)
    return out


# ---- Markdown ---------------------------------------------------------------------------------------

def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    return str(value)


def _loss_cell(loss: dict[str, Any] | None) -> str:
    if not loss:
        return "-"
    if not loss.get("finite"):
        return "NOT finite"
    trend = {True: "decreasing", False: "not decreasing", None: "too few steps"}[loss.get("decreasing")]
    return f"finite, {trend} ({_num(loss.get('first'))} -> {_num(loss.get('last'))})"


def _status(entry: dict[str, Any]) -> str | None:
    if entry["status"] == "ok":
        return None
    return f"{entry['status']}: {entry.get('reason') or ''}".strip()


def _training_table(entries: list[dict[str, Any]], with_mfu: bool) -> list[str]:
    head = "| case | precision | attention | optimizer | grad ckpt | compile | batch | s/step | img/s |"
    head += " MFU |" if with_mfu else ""
    head += " peak VRAM GiB (alloc / reserved) | loss |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in entries:
        c, m = e["settings"], e.get("metrics") or {}
        precision = c["mixed_precision"] + (" + full_bf16" if c["full_bf16"] else "")
        row = [e["name"], precision, c["attention"], c["optimizer"], _num(c["gradient_checkpointing"]),
               _num(c["torch_compile"]), str(e.get("batch_size") or "-")]
        status = _status(e)
        if status:
            lines.append("| " + " | ".join(row) + f" | {status} |" + " |" * (3 + with_mfu))
            continue
        row += [_num(m.get("s_per_step")), _num(m.get("img_per_s"), 2)]
        if with_mfu:
            row.append(f"{100 * m['mfu']:.1f} %" if m.get("mfu") is not None else "-")
        if m.get("peak_vram_gib") is None:
            memory = f"- (no CUDA; peak RSS {_num(m.get('peak_rss_gib'), 2)})"
        else:
            memory = f"{_num(m.get('peak_vram_gib'), 2)} / {_num(m.get('peak_reserved_gib'), 2)}"
        row += [memory, _loss_cell(m.get("loss"))]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _targets(results: dict[str, Any]) -> list[str]:
    by_name = {e["name"]: e for e in results["cases"]}
    meta = results["meta"]
    lines = ["## Targets", ""]
    ft = (by_name.get("ft-bf16") or {}).get("metrics") or {}
    if ft.get("mfu") is not None:
        verdict = "met" if ft["mfu"] >= MFU_TARGET else "NOT met"
        lines.append(f"- full fine-tune MFU >= {100 * MFU_TARGET:.0f} %: {100 * ft['mfu']:.1f} % ({verdict}; "
                     f"{meta['flops_per_image'] / 1e12:.2f} TFLOP per image, peak {meta['peak_tflops']:.0f} TFLOP/s)")
    else:
        lines.append(f"- full fine-tune MFU >= {100 * MFU_TARGET:.0f} %: not measured")
    b1 = (by_name.get("lora-b1-gc") or {}).get("metrics") or {}
    if b1.get("peak_reserved_gib"):
        verdict = "met" if b1["peak_reserved_gib"] <= VRAM_TARGET_GIB else "NOT met"
        lines.append(f"- LoRA 512 px batch 1 with gradient checkpointing <= {VRAM_TARGET_GIB:.0f} GiB: peak reserved "
                     f"{b1['peak_reserved_gib']:.2f} GiB, allocated {b1['peak_vram_gib']:.2f} GiB ({verdict})")
    else:
        lines.append(f"- LoRA batch 1 with gradient checkpointing <= {VRAM_TARGET_GIB:.0f} GiB: not measured")
    z3 = (by_name.get("ft-zero3-offload-gc") or {}).get("metrics") or {}
    if z3.get("peak_reserved_gib"):
        verdict = "met" if z3["peak_reserved_gib"] < ZERO3_TARGET_GIB else "NOT met"
        lines.append(f"- full fine-tune with ZeRO-3 + offload + checkpointing < {ZERO3_TARGET_GIB:.0f} GiB: peak reserved "
                     f"{z3['peak_reserved_gib']:.2f} GiB, allocated {z3['peak_vram_gib']:.2f} GiB ({verdict})")
    else:
        lines.append(f"- full fine-tune with ZeRO-3 + offload + checkpointing < {ZERO3_TARGET_GIB:.0f} GiB: not measured")
    lines.append(f"- LoRA step <= {KOHYA_RATIO_TARGET}x kohya's: {meta['env'].get('kohya', 'kohya not carried')}")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """The report: environment, one table per kind of case, skipped cases, targets."""
    meta, env = results["meta"], results["meta"]["env"]
    entries = results["cases"]
    for e in entries:
        e.setdefault("batch_size", e["settings"].get("batch_size") or meta["sizes"]["batch_size"])
    sizes = meta["sizes"]
    lines = [f"# GPU benchmark ({'CPU smoke run' if meta['cpu_smoke'] else 'full size'})", "",
             f"- device: {env['device']}; torch {env['torch']} (CUDA {env['torch_cuda']}); Python {env['python']}",
             f"- model: {sizes['preset']} (random weights), {sizes['resolution']} px, batch {sizes['batch_size']}, "
             f"{sizes['steps']} steps per case (first {sizes['warmup']} not timed); LoRA dim 16 / alpha 8",
             f"- xformers: {env['xformers']}; bitsandbytes: {env['bitsandbytes']}; deepspeed: "
             f"{env.get('deepspeed', 'not probed')}; --torch_compile: {env['torch_compile']}",
             f"- packages: {', '.join(f'{k} {v}' for k, v in (env.get('packages') or {}).items() if v) or '-'}",
             f"- peak VRAM: torch.cuda.max_memory_allocated / max_memory_reserved during training "
             f"(CUDA context not included)", ""]
    lora = [e for e in entries if e["kind"] == "lora"]
    if lora:
        lines += ["## LoRA", ""] + _training_table(lora, with_mfu=False) + [""]
    ft = [e for e in entries if e["kind"] == "ft"]
    if ft:
        lines += ["## Full fine-tuning", ""] + _training_table(ft, with_mfu=True) + [""]
    for e in entries:
        m, status = e.get("metrics") or {}, _status(e)
        if e["kind"] == "sampling":
            s = m.get("sampling") or {}
            text = status or (f"{s.get('rounds', 0)} round(s), peak VRAM per round (GiB): "
                              f"{', '.join(_num(p, 3) for p in s.get('round_peak_gib', [])) or '-'}; flat: "
                              f"{_num(s.get('flat'))}; training peak {_num(m.get('peak_vram_gib'), 2)} GiB; "
                              f"s/step between rounds {_num(m.get('s_per_step'))}; loss {_loss_cell(m.get('loss'))}")
            lines += ["## Sampling during training", "", f"- {e['name']}: {text}", ""]
        elif e["kind"] == "latents":
            text = status or (f"{m.get('images')} images in {_num(m.get('seconds'), 2)} s: "
                              f"{_num(m.get('img_per_s'), 1)} img/s (VAE {_num(m.get('vae_seconds'), 2)} s, waiting "
                              f"for images {_num(m.get('wait_seconds'), 2)} s; vae_batch_size "
                              f"{m.get('vae_batch_size')}, {m.get('workers')} workers)")
            lines += ["## Latent caching", "", f"- {e['name']}: {text}", ""]
    resume = [e for e in entries if e["kind"] == "resume"]
    if resume:
        lines += ["## Exact resume", ""]
        for e in resume:
            m = e.get("metrics") or {}
            text = _status(e) or (f"max abs weight difference {_num(m.get('max_abs_diff'), 3)} "
                                  f"({'bit-identical' if m.get('exact') else 'not bit-identical'}); "
                                  f"loss {_loss_cell(m.get('loss'))}")
            lines.append(f"- {e['name']} (deterministic: {_num(bool(m.get('deterministic')))}): {text}")
        lines.append("")
    return "\n".join(lines + _targets(results)) + "\n"
