"""`opsd eval`: greedy accuracy of a model, or of a run's checkpoint, on held-out problems."""

from __future__ import annotations

from pathlib import Path

from opsd_kernels.trainer.checkpoint import load_model_weights
from opsd_kernels.trainer.config import OPSDConfig


def evaluate_checkpoint(config: OPSDConfig, checkpoint: str | Path | None = None,
                        ) -> dict[str, float]:
    """Accuracy on ``config.eval_data`` of ``config.model`` (LoRA added per the config), with
    the weights of ``checkpoint`` (a run's checkpoint-N or final directory) when given."""
    from opsd_kernels.trainer.models import load_model_and_tokenizer
    from opsd_kernels.trainer.trainer import OPSDTrainer

    if config.eval_data is None:
        raise ValueError("config.eval_data: required for opsd eval")
    model, tokenizer = load_model_and_tokenizer(config)
    trainer = OPSDTrainer(model, tokenizer, config.eval_data, config,
                          eval_dataset=config.eval_data)
    if checkpoint is not None:
        load_model_weights(trainer.model, Path(checkpoint))
    return trainer.evaluate()
