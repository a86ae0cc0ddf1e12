"""kdcache: precompute teacher logits once, distil many students, fit distillation scaling laws."""

__version__ = "0.1.0"
