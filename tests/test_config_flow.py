"""Every Recipe field is a flag of `run` and `jobs submit` and a field of the `POST /v1/jobs` body;
every server setting is a `serve` flag and an environment variable. The values are generated from
the models, so a field added later is covered with no change here."""

import re
import typing

import pytest
from pydantic_core import PydanticUndefined
from typer.testing import CliRunner

from llm_prune.cli import app as cli_app, _register
from llm_prune.cli import recipe_flags
from llm_prune.recipe import Recipe
from service.schemas import SERVER_DECIDES, JobCreate
from service.settings import Settings

_register()


def _changed(field, path):
    """A valid value different from the field's default."""
    ann = recipe_flags._strip_optional(field.annotation)
    default = None if field.default is PydanticUndefined else field.default
    bounds = {k: getattr(m, k) for m in field.metadata for k in ("gt", "ge", "lt", "le") if hasattr(m, k)}
    if typing.get_origin(ann) is typing.Literal:
        return next(a for a in reversed(typing.get_args(ann)) if a != default)
    if ann is bool:
        return not default
    if ann is int:
        low = bounds.get("ge", bounds.get("gt", 0) + 1 if "gt" in bounds else 1)
        return (default + 1) if default is not None else max(low, 3)
    if ann is float:
        return (default or 0.1) * 0.5
    if typing.get_origin(ann) is list:
        return ["piqa", "boolq"] if path[-1] == "tasks" else ["alpha", "beta"]  # task names are checked
    if typing.get_origin(ann) is dict:
        return {"label": "x"}
    if path[-1] == "model":
        return "some-model"
    return f"value-{path[-1]}"


def _leaves():
    for name, field in Recipe.model_fields.items():
        section = recipe_flags._section_model(field)
        if section is None:
            yield (name,), field
        else:
            for sub, f in section.model_fields.items():
                yield (name, sub), f


def _put(tree, path, value):
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _get(tree, path):
    for part in path:
        tree = tree[part] if isinstance(tree, dict) else getattr(tree, part)
    return tree


def _argv(flags, leaves):
    argv = []
    for path, value in leaves:
        flag = next(f for f in flags if f.path == path)
        if flag.kind == "bool":
            argv.append(flag.name if value else f"--no-{flag.name[2:]}")
        elif flag.kind == "list":
            argv += [flag.name, ",".join(value)]
        elif flag.kind == "json":
            import json

            argv += [flag.name, json.dumps(value)]
        else:
            argv += [flag.name, str(value)]
    return argv


def _values(exclude=()):
    out = []
    for path, field in _leaves():
        if path == ("budget", "target_params") or path[0] in exclude:
            continue  # one of ratio / target_params (checked below)
        out.append((path, _changed(field, path)))
    return out


def test_every_recipe_field_is_a_run_flag(monkeypatch, tmp_path):
    import llm_prune.pipeline

    seen = []
    monkeypatch.setattr(llm_prune.pipeline, "run_recipe", lambda recipe, out, on_event=None: seen.append(recipe) or {})
    monkeypatch.setattr("llm_prune.cli.run.render_summary", lambda summary: "")
    from llm_prune.cli.run import FLAGS

    values = [(p, v) for p, v in _values() if p != ("model",)]
    argv = ["run", "some-model", "-o", str(tmp_path / "job"), *_argv(FLAGS, values)]
    result = CliRunner().invoke(cli_app, argv)
    assert result.exit_code == 0, result.output
    recipe = seen[0]
    for path, value in values:
        assert _get(recipe, path) == value, path
    # The other budget form, and every flag has help text.
    result = CliRunner().invoke(cli_app, ["run", "m", "-o", str(tmp_path / "j2"), "--target-params", "1000"])
    assert result.exit_code == 0 and seen[1].budget.target_params == 1000
    assert all(f.field.description for f in FLAGS), [f.dotted for f in FLAGS if not f.field.description]


def test_every_recipe_field_is_a_submit_flag_and_an_api_field(monkeypatch):
    import service.cli

    sent = []

    class FakeClient:  # stands in for the HTTP client only; the body is what the server would get
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def upload(self, path, purpose):
            return {"id": f"file-{purpose}"}

        def submit(self, body):
            sent.append(body)
            return {"id": "job-1"}

    monkeypatch.setattr(service.cli, "_client", FakeClient)
    values = _values(exclude=SERVER_DECIDES)
    result = CliRunner().invoke(cli_app, ["jobs", "submit", *_argv(service.cli.SUBMIT_FLAGS, values)])
    assert result.exit_code == 0, result.output
    body = sent[0]
    assert body["data"].pop("file_id") == "file-recovery"
    # The API body takes the same value for every field (files by upload id).
    parsed = JobCreate.model_validate({**body, "data": {**body["data"], "file_id": "file-recovery"}})
    for path, value in values:
        if path == ("data", "pool"):
            assert parsed.data.file_id == "file-recovery"
            continue
        expected = "file-eval" if path in (("evaluation", "ppl"), ("pruning", "calibration")) else value
        assert _get(body, path) == expected, path
        assert _get(parsed, path) == expected, path
    assert set(JobCreate.model_fields) == set(Recipe.model_fields) - set(SERVER_DECIDES)


def test_api_rejects_what_the_recipe_rejects():
    with pytest.raises(Exception, match="greater than or equal to 16"):
        JobCreate.model_validate({"model": "m", "budget": {"ratio": 0.2}, "recovery": {"cutoff_len": 4}})


def test_flag_errors_name_the_flag(tmp_path, capsys):
    from llm_prune.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "m", "-o", str(tmp_path / "j"), "--ratio", "0.2", "--cutoff-len", "4"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.strip() == "error: --cutoff-len must be >= 16, got 4", err
    with pytest.raises(SystemExit):
        main(["run", "m", "-o", str(tmp_path / "j"), "--ratio", "0.2", "--recovery", "magic"])
    assert "--recovery:" in capsys.readouterr().err


def test_token_counts_past_any_real_job_are_refused_before_any_work(tmp_path, capsys):
    """10**30 tokens per calibration batch passed validation, and prune, run and jobs submit crashed
    in torch (`Overflow when unpacking long long`) after the model had loaded."""
    from llm_prune.cli import main

    huge = str(10**30)
    for argv in (["run", "m", "-o", str(tmp_path / "j")], ["prune", "m", "-o", str(tmp_path / "p")],
                 ["jobs", "submit", "--model", "m"]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--ratio", "0.2", "--calibration-batch-tokens", huge])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.strip() == \
            f"error: --calibration-batch-tokens must be <= {2**31}, got {huge}", err
    for section, name in (("pruning", "calibration_tokens"), ("pruning", "reconstruct_tokens"),
                          ("data", "token_budget"), ("evaluation", "seq_len")):
        with pytest.raises(Exception, match="less than or equal to"):
            Recipe.model_validate({"model": "m", "budget": {"ratio": 0.2}, section: {name: 10**30}})
    with pytest.raises(Exception, match="less than or equal to"):
        JobCreate.model_validate({"model": "m", "budget": {"ratio": 0.2}, "pruning": {"calibration_tokens": 10**30}})


# A learning rate has no ceiling: training that diverges at one is refused when it does (train.py).
NO_UPPER_BOUND = {("recovery", "learning_rate")}


def test_every_number_a_recipe_takes_has_an_upper_bound(tmp_path, capsys):
    """--micro-batch 10**30 crashed in the DataLoader after pruning, and --epochs 1e30 trained for
    ever (max_steps stops at 10 million): every number field has a ceiling, refused up front."""
    from llm_prune.cli import main

    numbers = [(path, f) for path, f in _leaves() if recipe_flags._strip_optional(f.annotation) in (int, float)]
    unbounded = {path for path, f in numbers if not any(hasattr(m, "le") or hasattr(m, "lt") for m in f.metadata)}
    assert unbounded == NO_UPPER_BOUND, unbounded
    for flag, value in (("--micro-batch", str(10**30)), ("--epochs", "1e30"), ("--gradient-accumulation", "1000000000")):
        with pytest.raises(SystemExit) as exc:
            main(["run", "m", "-o", str(tmp_path / "j"), "--ratio", "0.2", flag, value])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith(f"error: {flag} must be <= ") and len(err.splitlines()) == 1, err


def test_a_lora_alpha_that_overflows_the_scaling_is_refused(tmp_path, capsys):
    """--lora-alpha 10**30 overflowed LoRA's scaling: recovery changed nothing (final perplexity
    exactly the pruned one) and reported success."""
    from llm_prune.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "m", "-o", str(tmp_path / "j"), "--ratio", "0.2", "--lora-alpha", str(10**30)])
    assert exc.value.code == 2 and capsys.readouterr().err.strip() == f"error: --lora-alpha must be <= 10000, got {10**30}"
    with pytest.raises(Exception, match="less than or equal to 10000"):
        JobCreate.model_validate({"model": "m", "budget": {"ratio": 0.2}, "recovery": {"lora_alpha": 10**5}})


def test_colliding_flag_names_fail_at_once():
    with pytest.raises(RuntimeError, match="recovery.seed"):
        recipe_flags.recipe_flags(names={"recovery.seed": "--seed"})


def _settings_value(name, field):
    if name == "data_dir":
        return "/tmp/llm-prune-data"
    if name == "host":
        return "localhost"
    if name == "device":  # checked at start-up: another value that exists on every machine
        return "auto"
    return _changed(field, (name,))


def test_every_setting_is_a_serve_flag_and_a_variable(monkeypatch):
    import uvicorn

    import service.app
    from service.cli import SERVE_FLAGS

    got = []
    monkeypatch.setattr(service.app, "create_app", lambda settings: got.append(settings))
    import service.cli

    monkeypatch.setattr(service.cli, "_listen", lambda host, port: None)
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: None)
    values = [((name,), _settings_value(name, f)) for name, f in Settings.model_fields.items()]
    result = CliRunner().invoke(cli_app, ["serve", *_argv(SERVE_FLAGS, values)])
    assert result.exit_code == 0, result.output
    for (name,), value in values:
        assert str(getattr(got[0], name)) == str(value), name
        monkeypatch.setenv(f"LLM_PRUNE_{name.upper()}", str(value).lower() if isinstance(value, bool) else str(value))
    from_env = Settings()
    for (name,), value in values:
        assert str(getattr(from_env, name)) == str(value), name


def test_deprecated_flags_still_work_and_say_so(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(f'{{"instruction": "q{i}", "output": "a{i}"}}\n' for i in range(10)))
    result = CliRunner().invoke(cli_app, ["select", str(pool), "-o", str(tmp_path / "sel"), "--method", "random",
                                          "--budget", "4", "--max-length", "64", "--json"])
    assert result.exit_code == 0, result.output
    assert "--max-length is deprecated; use --cutoff-len" in result.stderr
    assert sum(1 for _ in (tmp_path / "sel" / "selected.jsonl").open()) == 4


def test_recipe_values_a_user_can_get_wrong(tmp_path):
    """A budget flag replaces the file's budget (it said 'not both' of a user who typed one);
    true is no number; NaN in metadata was written bare into config.json; a pipe is no file."""
    import os

    from llm_prune.errors import UserError
    from llm_prune.recipe import deep_merge, parse_recipe

    merged = deep_merge({"model": "m", "budget": {"ratio": 0.2}, "data": {"budget": 0.5}},
                        {"budget": {"target_params": 5000}, "data": {"budget": 0.3}})
    assert merged == {"model": "m", "budget": {"target_params": 5000}, "data": {"budget": 0.3}}
    for data, needle in [({"budget": {"target_params": True}}, "budget: target_params must be a number, not true"),
                         ({"budget": {"ratio": 0.2}, "pruning": {"stages": False}}, "stages must be a number"),
                         ({"budget": {"ratio": 0.2}, "metadata": {"a": [1, {"b": float("nan")}]}},
                          "metadata: nan is not a JSON number")]:
        with pytest.raises(UserError, match=re.escape(needle)):
            parse_recipe({"model": "m", **data})
    assert parse_recipe({"model": "m", "budget": {"ratio": 0.2}, "trust_remote_code": True}).trust_remote_code
    os.mkfifo(tmp_path / "calib.txt")
    recipe = parse_recipe({"model": "m", "budget": {"ratio": 0.2}, "pruning": {"calibration": str(tmp_path / "calib.txt")}})
    with pytest.raises(UserError, match="is not a regular file"):
        recipe.check_files()


def test_metadata_nested_past_the_services_limit_is_refused_by_run_too(tmp_path, capsys):
    """`run` took metadata of any depth: 900 levels crashed writing recipe.json once the job had
    started, 3000 crashed parsing the flag (RecursionError), while the service refused past 64.
    One limit now, the same for both, said in one line."""
    from llm_prune.cli import main
    from llm_prune.errors import UserError
    from llm_prune.recipe import MAX_DEPTH, parse_recipe

    nested = lambda levels: {"a": [] if levels == 1 else [nested(levels - 1)["a"]]}  # noqa: E731
    for depth in (MAX_DEPTH, 900, 3000):
        with pytest.raises(SystemExit) as exc:
            main(["run", "m", "-o", str(tmp_path / "j"), "--ratio", "0.2", "--metadata",
                  '{"a": ' + "[" * depth + "]" * depth + "}"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.strip() == f"error: --metadata: nested deeper than {MAX_DEPTH} levels", err
    # The metadata object is level 1 of the recipe and of a job body alike.
    body = {"model": "m", "budget": {"ratio": 0.2}}
    parse_recipe({**body, "metadata": nested(MAX_DEPTH - 2)})
    JobCreate.model_validate({**body, "metadata": nested(MAX_DEPTH - 2)})
    with pytest.raises(UserError, match=f"metadata: nested deeper than {MAX_DEPTH} levels"):
        parse_recipe({**body, "metadata": nested(MAX_DEPTH - 1)})
    with pytest.raises(UserError, match=f"nested deeper than {MAX_DEPTH} levels"):
        JobCreate.model_validate({**body, "metadata": nested(MAX_DEPTH - 1)})


def test_a_key_given_twice_in_a_recipe_file_is_refused(tmp_path):
    """Both parsers kept the last value silently: a second `budget:` pruned at 0.3 without a word.
    A YAML merge (`<<:`) may still be overridden."""
    from llm_prune.errors import UserError
    from llm_prune.recipe import load_recipe_file

    cases = {"a.yaml": "model: m\nbudget: {ratio: 0.2}\nbudget: {ratio: 0.3}\n",
             "b.json": '{"model": "m", "budget": {"ratio": 0.2, "ratio": 0.3}}'}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match="is given twice in one mapping"):
            load_recipe_file(tmp_path / name)
    (tmp_path / "c.yaml").write_text("base: &b {ratio: 0.2, x: 1}\nmodel: m\nbudget:\n  <<: *b\n  ratio: 0.3\n")
    assert load_recipe_file(tmp_path / "c.yaml")["budget"] == {"ratio": 0.3, "x": 1}
