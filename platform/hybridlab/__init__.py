"""hybridlab — design, train and compare hybrid Mamba-3 / attention language models."""

__version__ = "0.1.0"
