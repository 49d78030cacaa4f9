"""Seconds per AdamW step on the CPU: torch.optim.AdamW (foreach) against DeepSpeed's DeepSpeedCPUAdam, the
optimizer ``--deepspeed --offload_optimizer_device cpu`` steps with (docs/distributed.md#deepspeed).

    python bench/cpu_adam.py [--params 200] [--steps 5] [--threads N]

``--params`` is in millions of float32 parameters, in tensors of 4 M (an SD1.5 UNet has 860 M; each
optimizer holds 16 bytes per parameter: weight, gradient, two moments). Prints the median step time of each
and their ratio, and the largest difference of the weights after the same steps (round-off: both compute
AdamW with decoupled weight decay in float32). The first run JIT-compiles DeepSpeed's cpu_adam op with g++
(about 40 s on 2 cores; cached in ~/.cache/torch_extensions)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _params(count: int, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    chunk = 4 * 1024 * 1024
    out = []
    for i in range(max(1, count // chunk)):
        p = torch.nn.Parameter(torch.randn(chunk, generator=g))
        p.grad = torch.randn(chunk, generator=g) * 1e-3
        out.append(p)
    return out


def _time(opt: torch.optim.Optimizer, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    """Parse the options, time both optimizers on the same weights and gradients, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=200, help="millions of float32 parameters (default 200)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    count = args.params * 1_000_000
    kwargs = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    results = {}
    weights = {}
    for name in ("torch AdamW (foreach)", "DeepSpeedCPUAdam"):
        params = _params(count, seed=0)
        opt = (torch.optim.AdamW(params, foreach=True, **kwargs) if name.startswith("torch")
               else DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs))
        opt.step()  # warm-up: moments allocated (and the op loaded)
        results[name] = statistics.median(_time(opt, args.steps))
        weights[name] = [p.detach().clone() for p in params[:2]]
        del opt, params
    ratio = results["DeepSpeedCPUAdam"] / results["torch AdamW (foreach)"]
    diff = max(float((a - b).abs().max()) for a, b in zip(*weights.values()))
    print(f"{count / 1e6:.0f} M float32 parameters, {torch.get_num_threads()} thread(s), median of {args.steps} steps")
    for name, seconds in results.items():
        print(f"  {name:24s} {seconds:7.3f} s/step  ({count / seconds / 1e6:7.1f} M params/s)")
    print(f"  DeepSpeedCPUAdam / torch: {ratio:.2f}; largest weight difference after {args.steps + 1} steps: {diff:.2e}")


if __name__ == "__main__":
    main()
