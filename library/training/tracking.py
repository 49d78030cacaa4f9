"""Progress and logs: a tqdm bar with loss and learning rate, TensorBoard / W&B through accelerate."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class LossAverage:
    """Moving average of the loss over the last epoch's worth of steps (what the bar shows)."""

    def __init__(self, window: int):
        """Average over at most ``window`` values."""
        self.values: deque[float] = deque(maxlen=max(1, window))

    def add(self, value: float) -> float:
        """Record a value; return the current average."""
        self.values.append(value)
        return self.average

    @property
    def average(self) -> float:
        """The mean of the recorded values (0 when empty)."""
        return sum(self.values) / len(self.values) if self.values else 0.0


class Tracker:
    """The progress bar (main process only) and scalar logging through accelerate's trackers."""

    def __init__(self, accelerator: Any, *, total_steps: int, initial_step: int, enabled_logging: bool):
        """Create the bar at ``initial_step`` of ``total_steps``."""
        self.accelerator = accelerator
        self.logging = enabled_logging
        self.bar = tqdm(total=total_steps, initial=initial_step, smoothing=0, desc="steps",
                        disable=not accelerator.is_local_main_process, dynamic_ncols=True)
        self.started = time.perf_counter()
        self.pinned: dict[str, float] = {}  # values shown in the bar until replaced (e.g. the validation loss)
        self.shown: dict[str, str] = {}

    def step(self, global_step: int, logs: dict[str, float]) -> None:
        """Advance the bar by one optimizer step and log the scalars."""
        self.bar.update(1)
        bar_keys = ("loss/current", "loss/average", "max_norm/keys_scaled", "norm/avg_key_norm")  # + every lr/
        shown = {k.split("/")[-1] if not k.startswith("lr/") else k: v for k, v in logs.items()
                 if k in bar_keys or k.startswith("lr/")}
        shown.update(self.pinned)
        self.shown = {k: f"{v:.3g}" for k, v in shown.items()}
        self.bar.set_postfix(self.shown, refresh=False)
        if self.logging:
            self.accelerator.log(logs, step=global_step)

    def pin(self, name: str, value: float) -> None:
        """Show ``name=value`` in the bar from now on (until pinned again)."""
        self.pinned[name] = value
        self.shown[name] = f"{value:.3g}"
        self.bar.set_postfix(self.shown, refresh=False)

    def log(self, logs: dict[str, float], step: int) -> None:
        """Log scalars that are not tied to a bar update (e.g. epoch averages)."""
        if self.logging:
            self.accelerator.log(logs, step=step)

    def write(self, message: str) -> None:
        """Log a warning line (main process): above the bar on stderr, or in ``--console_log_file``."""
        if self.accelerator.is_local_main_process:
            logger.warning("%s", message)

    def close(self) -> None:
        """Close the bar and the trackers."""
        self.bar.close()
        if self.logging:
            self.accelerator.end_training()
