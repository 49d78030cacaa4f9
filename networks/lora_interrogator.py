"""Find the tokens whose text-encoder output a LoRA changes most (its likely trigger words).

    python networks/lora_interrogator.py --sd_model model.safetensors --model lora.safetensors

Every vocabulary token t is encoded as the sequence [BOS, t, EOS] once without and once with the
LoRA (multiplier 1); t scores the mean absolute difference of the hidden states. The top 100 are
printed as ``[rank]: <id> <token>: <score>``. Only the LoRA's text-encoder part matters.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402

logger = logging.getLogger(__name__)

TOP_N = 100


def setup_parser() -> argparse.ArgumentParser:
    """Command-line options (the reference's names)."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--v2", action="store_true", help="the model is SD2.x (checked against the weights)")
    p.add_argument("--sd_model", type=str, default=None,
                   help="Stable Diffusion model: ldm .ckpt/.safetensors file or diffusers folder")
    p.add_argument("--model", type=str, default=None, help="LoRA file to interrogate")
    p.add_argument("--batch_size", type=int, default=16, help="tokens encoded per batch (default 16)")
    p.add_argument("--clip_skip", type=int, default=None,
                   help="use the n-th text-encoder layer from the end (2 = penultimate), as in training")
    return p


def text_encoder_weights(weights_sd: dict) -> dict:
    """The ``lora_te*`` entries of a LoRA state dict."""
    return {k: v for k, v in weights_sd.items() if k.startswith("lora_te")}


def attach_lora(text_encoder, te_weights: dict, lora_path: str, model_path: str):
    """Hook the LoRA's text-encoder modules into ``text_encoder`` (multiplier 1); returns the network.

    Raises UserError when a LoRA module has no layer of that name or shape in this text encoder
    (a LoRA for the other SD version).
    """
    from networks.lora import create_network_from_weights

    network, _ = create_network_from_weights(1.0, None, None, text_encoder, None, weights_sd=te_weights,
                                             for_inference=True)
    names = {k.split(".", 1)[0] for k in te_weights}
    unmatched = sorted(names - {lora.lora_name for lora in network.text_encoder_loras})
    if unmatched:
        raise UserError(f"--model {lora_path}: {len(unmatched)} text-encoder modules have no matching layer in "
                        f"--sd_model {model_path} (e.g. {unmatched[0]}); is the LoRA for another SD version?")
    network.apply_to(text_encoder, None, apply_text_encoder=True, apply_unet=False)
    try:
        network.load_state_dict(te_weights, strict=True)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
        raise UserError(f"--model {lora_path} does not fit the text encoder of --sd_model {model_path}: "
                        f"{detail}") from None
    return network


def token_scores(text_encoder, network, token_ids: Sequence[int], bos: int, eos: int, clip_skip: int | None,
                 batch_size: int, device, dtype, progress: bool = True):
    """Mean |hidden(with LoRA) − hidden(without)| of [BOS, t, EOS] for every token t (1-D float tensor)."""
    import torch

    from library.data.tokens import run_text_encoder

    scores = []
    batches = range(0, len(token_ids), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="interrogating tokens", unit="batch")
    with torch.no_grad():
        for start in batches:
            chunk = torch.tensor(token_ids[start:start + batch_size], dtype=torch.long)
            ids = torch.stack([torch.full_like(chunk, bos), chunk, torch.full_like(chunk, eos)], dim=1).to(device)
            network.set_multiplier(0.0)
            plain = run_text_encoder(text_encoder, ids, clip_skip).float()
            network.set_multiplier(1.0)
            with_lora = run_text_encoder(text_encoder, ids, clip_skip).float()
            scores.append((with_lora - plain).abs().mean(dim=(1, 2)).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Score every token and print the top 100."""
    import torch

    from library.models.load import load_model
    from networks.lora_files import load_lora_file
    from networks.lora_tool_options import require_options

    args = setup_parser().parse_args(argv)
    require_options(args, sd_model="the Stable Diffusion model the LoRA was trained on",
                    model="the LoRA file to interrogate")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")
    if args.clip_skip is not None and args.clip_skip < 1:
        raise UserError(f"--clip_skip {args.clip_skip}: must be at least 1")

    te_weights = text_encoder_weights(load_lora_file(args.model, "--model").tensors)
    if not te_weights:
        print(f"LoRA {args.model} has no text-encoder modules (lora_te_* keys), so it does not change any "
              "token's embedding: nothing to interrogate")
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = load_model(args.sd_model, v2=True if args.v2 else None)
    text_encoder, tokenizer = model.text_encoder, model.tokenizer
    model.unet = model.vae = None  # only the text encoder is used
    network = attach_lora(text_encoder, te_weights, args.model, args.sd_model)
    text_encoder.to(device, dtype=dtype).eval()
    network.to(device, dtype=dtype)

    last_id = max(tokenizer.all_special_ids)
    token_ids = list(range(last_id + 1))
    scores = token_scores(text_encoder, network, token_ids, tokenizer.bos_token_id, tokenizer.eos_token_id,
                          args.clip_skip, args.batch_size, device, dtype)
    order = torch.argsort(scores, descending=True, stable=True)[:TOP_N]
    for i, index in enumerate(order.tolist()):
        token = token_ids[index]
        text = tokenizer.convert_ids_to_tokens(token)
        print(f"[{i:3d}]: {token:5d} {text:<20s}: {float(scores[index]):.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
