"""Convert a Stable Diffusion 1.x/2.x model between an ldm single file and a diffusers folder.

    python tools/convert_diffusers20_original_sd.py model.safetensors out_diffusers_folder
    python tools/convert_diffusers20_original_sd.py diffusers_folder model.ckpt --fp16

The input is a checkpoint when it is an existing file, otherwise a diffusers folder (or Hub id). The
output is a checkpoint when its name has an extension (.safetensors, else a torch pickle), otherwise a
diffusers folder (weights as .safetensors with --use_safetensors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (the reference's names)."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--v1", action="store_true", help="the input is SD1.x (checked against the weights)")
    p.add_argument("--v2", action="store_true", help="the input is SD2.x (checked against the weights)")
    p.add_argument("--unet_use_linear_projection", action="store_true",
                   help="accepted for compatibility: the UNet's projection type is always taken from the weights")
    p.add_argument("--fp16", action="store_true", help="load a diffusers input in fp16 and save in fp16")
    p.add_argument("--bf16", action="store_true", help="save in bf16")
    p.add_argument("--float", action="store_true", help="save in float32")
    p.add_argument("--save_precision_as", default="no", choices=["fp16", "bf16", "float", "no"],
                   help="save precision (same effect as the flags; default: keep the loaded dtype)")
    p.add_argument("--epoch", type=int, default=0, help="added to the epoch stored in a .ckpt output")
    p.add_argument("--global_step", type=int, default=0, help="added to the global_step stored in a .ckpt output")
    p.add_argument("--reference_model", default=None,
                   help="local diffusers folder: source of the scheduler and tokenizer for a diffusers output, "
                        "and of the component configs for an ldm input of non-standard architecture")
    p.add_argument("--use_safetensors", action="store_true", help="write a diffusers output's weights as .safetensors")
    p.add_argument("model_to_load", help="ldm checkpoint file (.ckpt/.safetensors), diffusers folder or Hub id")
    p.add_argument("model_to_save", help="output: a file name with extension (checkpoint) or a folder (diffusers)")
    return p


def _save_dtype(args):
    import torch

    if args.fp16 or args.save_precision_as == "fp16":
        return torch.float16
    if args.bf16 or args.save_precision_as == "bf16":
        return torch.bfloat16
    if args.float or args.save_precision_as == "float":
        return torch.float32
    return None


def _apply_reference(model, reference: str) -> None:
    """Take the scheduler config and tokenizer of a diffusers reference folder, where it has them."""
    folder = Path(reference)
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        cfg = json.loads(sched.read_text(encoding="utf-8"))
        model.scheduler_config = {k: v for k, v in cfg.items() if not k.startswith("_")}
    tok = folder / "tokenizer"
    if tok.is_dir():
        from transformers import CLIPTokenizer

        model.tokenizer = CLIPTokenizer.from_pretrained(str(tok))


def main(argv: Sequence[str] | None = None) -> int:
    """Load, convert and save; prints what was written."""
    args = build_parser().parse_args(argv)
    if args.v1 and args.v2:
        raise UserError("--v1 and --v2 cannot both be given")
    src, dst = Path(args.model_to_load), Path(args.model_to_save)
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise UserError(f"{dst}: refusing to overwrite the input model; choose another output name")
    import torch

    from library.models.load import load_model
    from library.models.save import save_model

    load_dtype = torch.float16 if (args.fp16 and not src.is_file()) else None
    # The SD version comes from the weights; --v1/--v2 only produce a warning when they disagree.
    stated_v2 = True if args.v2 else (False if args.v1 else None)
    model = load_model(args.model_to_load, v2=stated_v2, v_parameterization=None,
                       reference_model=args.reference_model if src.is_file() else None, dtype=load_dtype)
    if args.reference_model:
        _apply_reference(model, args.reference_model)
    if dst.suffix:
        fmt = "safetensors" if dst.suffix.lower() == ".safetensors" else "ckpt"
    else:
        fmt = "diffusers_safetensors" if args.use_safetensors else "diffusers"
    save_model(model, dst, fmt, save_dtype=_save_dtype(args), epoch=args.epoch, global_step=args.global_step)
    print(f"saved SD{'2' if model.v2 else '1'} model ({fmt}) to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
