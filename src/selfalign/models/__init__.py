"""The DiT/SiT backbone and its named presets."""
from .backbone import BackboneConfig, DiffusionTransformer, drop_labels
from .presets import backbone_config, build_model, count_parameters, parse_preset, preset_names

__all__ = ["BackboneConfig", "DiffusionTransformer", "drop_labels", "backbone_config",
           "build_model", "count_parameters", "parse_preset", "preset_names"]
