"""A thin on-policy self-distillation trainer on Hugging Face models: rollouts from the
student, the same model (current, initial or EMA weights) as teacher under a privileged prompt,
the fused divergence on the response tokens, shared prefixes for both roles.

Needs the training extras (transformers, accelerate, datasets, peft for LoRA); importing
`opsd_kernels` alone does not load this package. The names below load their modules on first
use, so reading the config (`opsd train --help`) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opsd_kernels._lazy import lazy_exports

# public name -> the module defining it
_EXPORTS = {
    "HFGenerateEngine": "opsd_kernels.trainer.rollouts",
    "OPSDConfig": "opsd_kernels.trainer.config",
    "OPSDTrainer": "opsd_kernels.trainer.trainer",
    "Problem": "opsd_kernels.trainer.data",
    "RolloutEngine": "opsd_kernels.trainer.rollouts",
    "SamplingParams": "opsd_kernels.trainer.rollouts",
    "TrainingStopped": "opsd_kernels.trainer.nonfinite",
    "evaluate": "opsd_kernels.trainer.evaluate",
    "load_problems": "opsd_kernels.trainer.data",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the names for type checkers ("as" marks them re-exported)
    from opsd_kernels.trainer.config import OPSDConfig as OPSDConfig
    from opsd_kernels.trainer.data import Problem as Problem
    from opsd_kernels.trainer.data import load_problems as load_problems
    from opsd_kernels.trainer.evaluate import evaluate as evaluate
    from opsd_kernels.trainer.nonfinite import TrainingStopped as TrainingStopped
    from opsd_kernels.trainer.rollouts import HFGenerateEngine as HFGenerateEngine
    from opsd_kernels.trainer.rollouts import RolloutEngine as RolloutEngine
    from opsd_kernels.trainer.rollouts import SamplingParams as SamplingParams
    from opsd_kernels.trainer.trainer import OPSDTrainer as OPSDTrainer


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
