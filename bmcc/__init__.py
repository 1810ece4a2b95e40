"""bmcc: bone-marrow cell classification in JAX (Matek et al., Blood 2021 dataset)."""

__version__ = "0.1.0"
