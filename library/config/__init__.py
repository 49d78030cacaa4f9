"""Dataset configuration: the ``--dataset_config`` TOML/JSON schema, the command-line fallback and the
resolved, frozen ``DatasetBlueprint`` that dataset builders consume.

Typical use in a training script::

    add_dataset_arguments(parser, support_dreambooth=True, support_caption=True, support_caption_dropout=True)
    add_config_arguments(parser)
    opts = Options.from_args(parser.parse_args(argv))
    blueprint = load_dataset_blueprint(opts.data, opts.validation, opts.data.dataset_config, given=opts.given)
"""

from library.config.arguments import (
    add_config_arguments,
    add_dataset_arguments,
    parse_face_crop_option,
    parse_resolution_option,
    split_folder_name,
)
from library.config.blueprint import (
    DREAMBOOTH,
    FINETUNING,
    BlueprintDataset,
    BlueprintSubset,
    DatasetBlueprint,
    DatasetStyle,
)
from library.config.loader import blueprint_from_dict, load_dataset_blueprint, read_config_file

__all__ = [
    "DREAMBOOTH",
    "FINETUNING",
    "BlueprintDataset",
    "BlueprintSubset",
    "DatasetBlueprint",
    "DatasetStyle",
    "add_config_arguments",
    "add_dataset_arguments",
    "blueprint_from_dict",
    "load_dataset_blueprint",
    "parse_face_crop_option",
    "parse_resolution_option",
    "read_config_file",
    "split_folder_name",
]
