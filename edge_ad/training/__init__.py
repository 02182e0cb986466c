"""Training: the generic fit loop, DDP plumbing and the ``edge_ad.train`` entry point."""
from .api import train
from .loop import FitConfig, FitResult, fit, step_seed

__all__ = ["FitConfig", "FitResult", "fit", "step_seed", "train"]
