"""Train: apply a plan to a real fine-tuning run (transformers Trainer, PEFT), re-planning as it goes."""

from spectune.train.config import TrainConfig, TrainConfigError, load_config

__all__ = ["TrainConfig", "TrainConfigError", "load_config"]
