"""llm-prune: structured pruning of Llama-family LLMs with data-aware recovery."""

__version__ = "0.1.0"
