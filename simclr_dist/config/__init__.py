"""Every job's configuration: typed dataclasses whose fields are the commands' flags, checked by one validator.

Layer: imports core/ and data/ only (dataset names, augmentation components), so run/ and the commands share it.
"""

from simclr_dist.config.base import (
    FORMATS,
    ConfigError,
    JobConfig,
    PretrainedError,
    bad,
    base_type,
    build_parser,
    check_fields,
    check_plain_name,
    flag,
    flag_name,
    is_uri,
    parse_into,
    parse_weights_spec,
)
from simclr_dist.config.pretrain import ARCH_FIELDS, KNN_SPLITS, LOADERS, PretrainConfig, parse_config

__all__ = ["ARCH_FIELDS", "FORMATS", "KNN_SPLITS", "LOADERS", "ConfigError", "JobConfig", "PretrainConfig",
           "PretrainedError", "bad", "base_type", "build_parser", "check_fields", "check_plain_name", "flag",
           "flag_name", "is_uri", "parse_config", "parse_into", "parse_weights_spec"]
