"""Install the toolkit: ``pip install -e .`` (``.[test]`` for the test suite)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements() -> list[str]:
    """The core requirements from requirements.txt (comments and blank lines dropped)."""
    lines = (HERE / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="sd-train",
    version="0.1.0",
    description="Train Stable Diffusion 1.x/2.x: fine-tuning, DreamBooth, LoRA, Textual Inversion (kohya-compatible)",
    python_requires=">=3.10",
    packages=find_packages(include=["library", "library.*", "networks", "networks.*", "finetune", "finetune.*",
                                    "tools", "tools.*"]),
    package_data={"library.models": ["configs/*/*.json", "tokenizer/*"]},
    install_requires=read_requirements(),
    extras_require={
        "xformers": ["xformers"],
        "bitsandbytes": ["bitsandbytes"],
        "lion": ["lion-pytorch"],
        "dadaptation": ["dadaptation"],
        "prodigy": ["prodigyopt"],
        "tagger": ["onnxruntime"],
        "wandb": ["wandb"],
        "upload": ["huggingface_hub"],
        "lycoris": ["lycoris-lora"],  # --network_module lycoris.kohya (pure Python, with einops)
        "test": ["pytest>=7", "pytest-xdist>=3", "psutil>=5", "peft", "wandb", "lion-pytorch", "prodigyopt", "dadaptation",
                 "onnx", "onnxruntime", "lycoris-lora", "grimp"],
    },
)
