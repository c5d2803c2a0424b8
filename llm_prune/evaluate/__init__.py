"""Evaluation: perplexity, the zero-shot commonsense suite (lm-eval prompts, offline data) and speed."""

from llm_prune.evaluate.harness import average_stderr, evaluate_model
from llm_prune.evaluate.ppl import perplexity, read_text_dataset, read_text_file
from llm_prune.evaluate.report import format_table, write_eval_results
from llm_prune.evaluate.scoring import loglikelihoods, score_items
from llm_prune.evaluate.speed import SpeedConfig, measure_speed
from llm_prune.evaluate.tasks import ALL_TASK_NAMES, COMMONSENSE_TASKS, Item, load_task, parse_tasks

__all__ = [
    "ALL_TASK_NAMES", "COMMONSENSE_TASKS", "Item", "SpeedConfig", "average_stderr", "evaluate_model", "format_table", "load_task",
    "loglikelihoods", "measure_speed", "parse_tasks", "perplexity", "read_text_dataset", "read_text_file",
    "score_items", "write_eval_results",
]
