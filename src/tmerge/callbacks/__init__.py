"""Lightning callbacks of tmerge's own (one class per module)."""

from tmerge.callbacks.alpha_trajectory import AlphaTrajectory

__all__ = ["AlphaTrajectory"]
