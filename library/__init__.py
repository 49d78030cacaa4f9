"""sd-train: training toolkit for Stable Diffusion 1.x / 2.x (kohya-ss/sd-scripts compatible)."""

__version__ = "0.1.0"
