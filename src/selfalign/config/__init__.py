"""Configuration: the typed loader (``loader``), preset files (``presets``) and the experiment schema
(``experiment``).

The package imports nothing itself, so the leaf modules (``loader``, ``presets``) stay importable
from any layer while ``experiment`` sits above the models, objectives and regularizers it names.
"""
