"""Every option today's kohya-ss/sd-scripts lists in ``--help`` for its SD1/SD2 training scripts is accepted by
ours (issue 15, §2): the list below is the set that was missing at the start of that work; the rest was there
already and is covered by the scripts' own tests. Each option's *effect* is tested where it is implemented
(tests/test_caption_options.py, test_image_cache_options.py, test_kohya_schedule_loss.py, test_network_extras.py,
test_precision_options.py, test_steps_logging_options.py, test_hub_and_modelspec.py)."""

from __future__ import annotations

import contextlib
import io

import pytest

import fine_tune
import train_db
import train_network
import train_textual_inversion

#: options every kohya HEAD training script registers (library/train_util.py, config_util, deepspeed_utils, ...)
COMMON = """
caption_prefix caption_suffix caption_separator keep_tokens_separator secondary_separator enable_wildcard
resize_interpolation cache_info skip_cache_check dataset_class min_timestep max_timestep
noise_offset_random_strength v_pred_like_loss scale_v_pred_loss_like_noise_pred fp8_base
fp16_master_weights_and_gradients fused_backward_pass highvram torch_compile dynamo_backend
lr_scheduler_min_lr_ratio lr_decay_steps lr_scheduler_timescale save_state_on_train_end ddp_timeout
ddp_static_graph ddp_gradient_as_bucket_view wandb_run_name log_config log_tracker_config console_log_level
console_log_file console_log_simple metadata_title metadata_author metadata_description metadata_license
metadata_tags metadata_trigger_phrase metadata_usage_hint metadata_thumbnail metadata_merged_from
metadata_preprocessor metadata_is_negative_embedding huggingface_repo_id huggingface_repo_type
huggingface_path_in_repo huggingface_token huggingface_repo_visibility save_state_to_huggingface
resume_from_huggingface async_upload deepspeed zero_stage offload_optimizer_device offload_optimizer_nvme_path
offload_param_device offload_param_nvme_path zero3_init_flag zero3_save_16bit_model config_file output_config
persistent_data_loader_workers lowram
""".split()

#: registered only by kohya's train_network.py
NETWORK_ONLY = """
base_weights base_weights_multiplier scale_weight_norms fp8_base_unet cpu_offload_checkpointing no_half_vae
skip_until_initial_step initial_epoch initial_step max_validation_steps
""".split()

SCRIPTS = {
    "train_network.py": (train_network.build_parser, COMMON + NETWORK_ONLY),
    "train_db.py": (train_db.build_parser, COMMON + ["learning_rate_te", "no_half_vae"]),
    "fine_tune.py": (fine_tune.build_parser, COMMON + ["learning_rate_te"]),
    "train_textual_inversion.py": (train_textual_inversion.build_parser, COMMON),
}


def _option_names(parser) -> set[str]:
    return {s[2:] for action in parser._actions for s in action.option_strings if s.startswith("--")}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_kohya_option_is_accepted_and_listed_in_help(script):
    build, expected = SCRIPTS[script]
    parser = build()
    missing = sorted(set(expected) - _option_names(parser))
    assert not missing, f"{script} lacks {missing}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    shown = out.getvalue()
    assert not [name for name in expected if f"--{name}" not in shown]


def test_xti_script_has_the_textual_inversion_options():
    import train_textual_inversion_XTI  # noqa: F401  (builds its parser through train_textual_inversion's)

    parser = train_textual_inversion.build_parser("train_textual_inversion_XTI.py")
    assert not sorted(set(COMMON) - _option_names(parser))
