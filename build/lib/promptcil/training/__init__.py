"""Training, one job per module: the task loop (loop.py), one step with its optimizer and schedule
(step.py), the folder of task states and resumable checkpoints (checkpoints.py), and first-session
adaptation for analytic heads (adaptation.py)."""

from promptcil.training.checkpoints import CheckpointStore, load_task_state, task_state_path
from promptcil.training.loop import IncrementalTrainer, TaskLog
from promptcil.training.step import epoch_lr, make_optimizer, shuffle_seed, train_step

__all__ = ["CheckpointStore", "IncrementalTrainer", "TaskLog", "epoch_lr", "load_task_state", "make_optimizer",
           "shuffle_seed", "task_state_path", "train_step"]
