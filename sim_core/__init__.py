"""simbench: a reproducibility and benchmark harness for box-supervised instance segmentation."""

__version__ = "0.1.0"
