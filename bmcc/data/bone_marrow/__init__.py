"""TFDS builder package for the bone-marrow cytomorphology dataset (Matek et al., Blood 2021)."""

from bmcc.data.bone_marrow.bone_marrow_dataset_builder import (
    KNOWN_BAD_FILES,
    Builder,
    prepare,
)

__all__ = ["KNOWN_BAD_FILES", "Builder", "prepare"]
