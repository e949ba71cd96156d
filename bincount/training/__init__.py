"""Training, tuning, debugger rules, profiler summaries and evaluation: plain Python, no Prefect.

The backend (``get_training_backend``) runs ``sm_scripts/train.py`` as a training job and returns
plain records (:class:`TrainingJob`); the search space, tuner, rule checks and evaluation work on
what the jobs leave under the artifact root.
"""

from bincount.training.backend import TrainingBackend, get_training_backend
from bincount.training.jobs import TrainingJob, TrainingJobFailed, TrainingJobSpec

__all__ = ["TrainingBackend", "TrainingJob", "TrainingJobFailed", "TrainingJobSpec", "get_training_backend"]
