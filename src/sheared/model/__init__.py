"""The decoder (architecture only), its masks, the supported families, loading and saving."""

from sheared.model.args import ModelArgs, parameter_counts
from sheared.model.decoder import CausalLM
from sheared.model.families import FAMILIES, Family, args_from_hf_config, hf_config_from_args
from sheared.model.loading import (
    DEFAULT_SOURCE,
    Source,
    load_source,
    load_tokenizer,
    read_source_config,
    save_hf,
)
from sheared.model.masks import LayerMasks, Masks

__all__ = [
    "DEFAULT_SOURCE",
    "FAMILIES",
    "CausalLM",
    "Family",
    "LayerMasks",
    "Masks",
    "ModelArgs",
    "Source",
    "args_from_hf_config",
    "hf_config_from_args",
    "load_source",
    "load_tokenizer",
    "parameter_counts",
    "read_source_config",
    "save_hf",
]
