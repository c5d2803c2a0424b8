"""Recovery training after pruning: LoRA, PERP, PERP+LoRA, full fine-tuning and QLoRA, all through
one `recover()` call that returns a plain dense model."""

from recovery.data import ResponseOnlyCollator, build_examples, tokenize_example
from recovery.recover import RecoveryResult, check_config, parameter_counts, prepare_method, recover

__all__ = ["RecoveryResult", "ResponseOnlyCollator", "build_examples", "check_config",
           "parameter_counts", "prepare_method", "recover", "tokenize_example"]
