"""One benchmark run in its own process: the real entry script's main(), with the loop observed.

    python bench/gpu/child.py SPEC.json RESULT.json

SPEC holds ``script`` (train_network / fine_tune), ``argv`` and ``deterministic``. The child wraps four
project functions while main() runs (nothing in library/ is changed):

- ``Trainer.run``: the start of training; CUDA peak-memory counters are reset there, so the peaks are
  those of training (weights, LoRA or optimizer state, activations), not of loading or latent caching;
- ``Tracker.step``: called once per optimizer step with the step's loss; the child synchronises CUDA
  and records the seconds since the previous step, the loss and the step's peak memory;
- ``Sampler.sample``: each sampling round's seconds and peak memory (left out of the step times);
- ``group_latents.cache_latents``: the latent cache's own statistics (images, seconds).

RESULT is written even when main() fails (``exit_code`` and ``error`` say why).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[2]


def set_deterministic() -> None:
    """Deterministic kernels where torch has them (warn where not); must run before CUDA is used."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


class Observer:
    """Collects what the wrapped functions see; :meth:`attached` installs and removes the wrappers."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.step_seconds: list[float] = []
        self.losses: list[float] = []
        self.step_peaks: list[int] = []
        self.step_reserved: list[int] = []
        self.rounds: list[dict[str, float]] = []
        self.latents: dict[str, Any] | None = None
        self._mark = 0.0
        self._excluded = 0.0  # sampling seconds inside the current step interval

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def _peaks(self) -> tuple[int, int]:
        """(allocated, reserved) peaks since the last reset, then reset; (0, 0) on the CPU."""
        if not self.cuda:
            return 0, 0
        import torch

        peaks = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        return peaks

    def started(self) -> None:
        """Training starts: reset the peaks and the step clock."""
        self._sync()
        self._peaks()
        self._mark, self._excluded = time.perf_counter(), 0.0

    def stepped(self, logs: dict[str, float]) -> None:
        """One optimizer step finished."""
        self._sync()
        now = time.perf_counter()
        self.step_seconds.append(now - self._mark - self._excluded)
        self.losses.append(float(logs.get("loss/current", float("nan"))))
        allocated, reserved = self._peaks()
        self.step_peaks.append(allocated)
        self.step_reserved.append(reserved)
        self._mark, self._excluded = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def sampling_round(self) -> Iterator[None]:
        """Time one sampling round and take its peak memory apart from the steps'."""
        self._sync()
        before = self._peaks()  # what the step phase reached since the last step
        if self.step_peaks:
            self.step_peaks[-1] = max(self.step_peaks[-1], before[0])
            self.step_reserved[-1] = max(self.step_reserved[-1], before[1])
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            seconds = time.perf_counter() - start
            allocated, reserved = self._peaks()
            self.rounds.append({"seconds": seconds, "peak_allocated": allocated, "peak_reserved": reserved})
            self._excluded += seconds

    @contextlib.contextmanager
    def attached(self) -> Iterator["Observer"]:
        """Wrap Trainer.run, Tracker.step, Sampler.sample and the group latent cache while inside."""
        from library.data import group_latents
        from library.training import sampling, tracking, trainer

        originals = [(trainer.Trainer, "run"), (tracking.Tracker, "step"), (sampling.Sampler, "sample"),
                     (group_latents, "cache_latents")]
        saved = [(owner, name, getattr(owner, name)) for owner, name in originals]
        run, step, sample, cache = (value for _, _, value in saved)
        observer = self

        def run_wrapper(self, *a, **k):
            observer.started()
            return run(self, *a, **k)

        def step_wrapper(self, global_step, logs):
            result = step(self, global_step, logs)
            observer.stepped(logs)
            return result

        def sample_wrapper(self, *a, **k):
            with observer.sampling_round():
                return sample(self, *a, **k)

        def cache_wrapper(*a, **k):
            results, stats = cache(*a, **k)
            observer.latents = {"encoded": stats.encoded, "reused": stats.reused, "failed": len(stats.failed),
                                "total_seconds": stats.total_seconds, "vae_seconds": stats.vae_seconds,
                                "wait_seconds": stats.wait_seconds, "batch_size": k.get("batch_size"),
                                "workers": k.get("workers")}
            return results, stats

        for (owner, name, _), wrapper in zip(saved, (run_wrapper, step_wrapper, sample_wrapper, cache_wrapper)):
            setattr(owner, name, wrapper)
        try:
            yield self
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)

    def as_dict(self) -> dict[str, Any]:
        """The raw measurements."""
        return {"step_seconds": self.step_seconds, "losses": self.losses, "step_peak_allocated": self.step_peaks,
                "step_peak_reserved": self.step_reserved, "sampling_rounds": self.rounds, "latents": self.latents}


def peak_rss_bytes() -> int:
    """This process's peak resident set size."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the spec's script in this process; the measurements, the exit code and any error."""
    if spec.get("deterministic"):
        set_deterministic()
    import torch

    from library.cli import run_main

    result: dict[str, Any] = {"exit_code": None, "error": None}
    start = time.perf_counter()
    observer = Observer()
    try:
        script = importlib.import_module(spec["script"])
        with observer.attached():
            result["exit_code"] = run_main(script.main, spec["argv"])
    except BaseException as exc:  # noqa: BLE001 - the parent gets the reason, whatever it was
        result["exit_code"] = result["exit_code"] if result["exit_code"] is not None else 1
        result["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-600:]
    result.update(observer.as_dict())
    result["wall_seconds"] = time.perf_counter() - start
    result["device"] = torch.cuda.get_device_name(0) if observer.cuda else "cpu"
    result["peak_rss"] = peak_rss_bytes()
    return result


def main(argv: list[str]) -> int:
    """``child.py SPEC RESULT``: run and write the result json."""
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    result = run_spec(json.loads(spec_path.read_text(encoding="utf-8")))
    result_path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0 if result["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
