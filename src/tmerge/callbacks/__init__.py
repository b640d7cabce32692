"""Lightning callbacks of tmerge's own, one class per module.

==================  ===================================================================  =========
callback            what it does                                                         state [1]
==================  ===================================================================  =========
AlphaTrajectory     the adaption stage's α per layer after every validation, logged      yes
BestMetrics         the validation metrics of the best epoch, and the training time      yes
EpochSummary        one ``[tmerge]`` progress line per validated epoch                   yes
FisherCallback      the empirical Fisher of the best weights, at the end of training     no
LearningCurve       test scores after epochs 1, 2, 4, … and the last; RNG restored       yes
NonFiniteGuard      stops the fit when the training loss becomes NaN/inf                 no
PredictionWriter    the predicted label maps of test and predict, in original geometry   no
RngState            the Python, NumPy and torch generators                               yes
SaveOnSigterm       a checkpoint when SIGTERM stops the fit                              no
StepStats           seconds per step, the device's wait between steps, peak memory       no
StopIfStopped       early stopping that survives a resume (reads EarlyStopping's state)  no
==================  ===================================================================  =========

[1] Whether it has a ``state_dict`` saved in checkpoints, so that a resumed fit continues with it.
:func:`tmerge.runner.fit` adds all but AlphaTrajectory, FisherCallback, LearningCurve and
PredictionWriter (which the stages pass), StepStats (only with ``trainer.step_stats``) and NonFiniteGuard (which :class:`~tmerge.modules.segmentation.SegmentationModule` brings along).
"""

from tmerge.callbacks.alpha_trajectory import AlphaTrajectory
from tmerge.callbacks.best_metrics import BestMetrics
from tmerge.callbacks.epoch_summary import EpochSummary
from tmerge.callbacks.fisher import FisherCallback
from tmerge.callbacks.learning_curve import LearningCurve
from tmerge.callbacks.nonfinite_guard import NonFiniteGuard
from tmerge.callbacks.prediction_writer import PredictionWriter
from tmerge.callbacks.rng_state import RngState
from tmerge.callbacks.save_on_sigterm import SaveOnSigterm
from tmerge.callbacks.step_stats import StepStats
from tmerge.callbacks.stop_if_stopped import StopIfStopped

__all__ = [
    "AlphaTrajectory",
    "BestMetrics",
    "EpochSummary",
    "FisherCallback",
    "LearningCurve",
    "NonFiniteGuard",
    "PredictionWriter",
    "RngState",
    "SaveOnSigterm",
    "StepStats",
    "StopIfStopped",
]
