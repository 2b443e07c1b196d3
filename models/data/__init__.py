"""Reading videos, the synthetic dataset, and the preprocessed store."""
