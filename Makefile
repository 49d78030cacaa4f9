# One command sets up a virtual environment and runs the whole test suite: `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup setup-deepspeed test test-fast demo clean

$(VENV)/.installed: setup.py requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# Optional: DeepSpeed ZeRO for --deepspeed (docs/distributed.md#deepspeed). An sdist, built without its C++/CUDA
# ops (they compile on first use) and against the installed torch.
$(VENV)/.deepspeed-installed: $(VENV)/.installed requirements-deepspeed.txt
	$(PY) -m pip install wheel setuptools hjson msgpack ninja py-cpuinfo
	DS_BUILD_OPS=0 $(PY) -m pip install --no-build-isolation -r requirements-deepspeed.txt
	touch $@

setup-deepspeed: $(VENV)/.deepspeed-installed

# The full suite, slow end-to-end tests included (what CI runs).
test: setup
	$(PY) -m pytest -n 2 --run-slow $(PYTEST_ARGS)

# The fast tier only.
test-fast: setup
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

# A LoRA trained on a tiny random model and generated images, through the real accelerate launch path.
DEMO ?= demo_output
demo: setup
	$(PY) tools/make_demo_data.py $(DEMO)
	ACCELERATE_USE_CPU=1 $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no train_network.py \
		--pretrained_model_name_or_path $(DEMO)/models/tiny-sd1.safetensors --dataset_config $(DEMO)/dataset.toml \
		--output_dir $(DEMO)/lora --output_name demo_lora --network_module networks.lora --network_dim 8 \
		--network_alpha 4 --learning_rate 1e-3 --max_train_epochs 10 --save_every_n_epochs 5 --seed 42 \
		--logging_dir $(DEMO)/logs --max_data_loader_n_workers 1

clean:
	rm -rf $(VENV) .pytest_cache $(DEMO)
