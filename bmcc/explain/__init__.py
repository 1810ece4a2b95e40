"""Explain a prediction: attribution maps (`methods`), pictures (`render`), `--mode=explain`."""
