"""llm-prune: structured pruning of Llama-family LLMs with data-aware recovery."""

from llm_prune.memory import bound_kernel_cache

bound_kernel_cache()  # before the first bfloat16 matmul compiles a kernel (memory.py says why)

__version__ = "0.1.0"
