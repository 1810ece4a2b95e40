"""Data: the class table, the TFDS builder, the synthetic dataset writer and the grain pipeline."""
