"""A thin on-policy self-distillation trainer on Hugging Face models: rollouts from the
student, the same model (current, initial or EMA weights) as teacher under a privileged prompt,
the fused divergence on the response tokens, shared prefixes for both roles.

Needs the training extras (transformers, accelerate, datasets, peft for LoRA); importing
`opsd_kernels` alone does not load this package.
"""

from opsd_kernels.trainer.config import OPSDConfig
from opsd_kernels.trainer.data import Problem, load_problems
from opsd_kernels.trainer.rollouts import HFGenerateEngine, RolloutEngine, SamplingParams
from opsd_kernels.trainer.trainer import OPSDTrainer

__all__ = [
    "HFGenerateEngine",
    "OPSDConfig",
    "OPSDTrainer",
    "Problem",
    "RolloutEngine",
    "SamplingParams",
    "load_problems",
]
