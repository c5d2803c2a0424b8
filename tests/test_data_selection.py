"""Recovery pool loading, budget allocation, the conflict filter and CLI input errors (no models)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_selection.allocate import allocate_budget, resolve_budget
from data_selection.conflicts import ConceptGraph
from data_selection.pool import Record, format_example, load_pool
from llm_prune.errors import UserError


def test_jsonl_mixed_forms_and_malformed_lines_are_reported(tmp_path):
    lines = [
        json.dumps({"instruction": "Add the numbers", "input": "2 and 3", "output": "5"}),
        "{not json",
        json.dumps({"conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "Hi"},
                                      {"from": "gpt", "value": "Hello."}], "id": "c1"}),
        json.dumps({"messages": [{"role": "user", "content": "Name a colour"},
                                 {"role": "assistant", "content": "Blue"}]}),
        json.dumps({"instruction": "No answer here"}),
        "",
        json.dumps({"instruction": "Empty answer", "output": "   "}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps([1, 2]),
        json.dumps({"title": "unknown form"}),
    ]
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(lines) + "\n")
    load = load_pool(path)
    assert [r.prompt for r in load.records] == ["Add the numbers\n\n2 and 3", "Hi", "Name a colour"]
    assert load.records[1].system == "Be terse." and load.records[1].source_id == "pool.jsonl:3#c1"
    assert load.records[0].source_id == "pool.jsonl:1"
    where = dict(load.errors)
    assert set(where) == {"pool.jsonl:2", "pool.jsonl:5", "pool.jsonl:7", "pool.jsonl:8", "pool.jsonl:9",
                          "pool.jsonl:10"}
    assert "invalid JSON" in where["pool.jsonl:2"]
    assert "no 'output'" in where["pool.jsonl:5"]
    assert "empty response" in where["pool.jsonl:7"]
    assert "no user turn followed by an assistant reply" in where["pool.jsonl:8"]
    assert "expected an object" in where["pool.jsonl:9"]
    assert "unknown form" in where["pool.jsonl:10"]


def test_truncated_json_array_keeps_good_records(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(3)]
    text = json.dumps(rows, indent=2)
    (tmp_path / "cut.json").write_text(text[: text.rindex("a2") ])  # cut inside the last record
    load = load_pool(tmp_path / "cut.json")
    assert [r.response for r in load.records] == ["a0", "a1"]
    assert len(load.errors) == 1 and "truncated" in load.errors[0][1]
    # Cut right after a whole element: every record is good, and the missing end is still told.
    (tmp_path / "cut2.json").write_text(text[: text.rindex("}") + 1])
    load = load_pool(tmp_path / "cut2.json")
    assert len(load.records) == 3 and len(load.errors) == 1
    assert "ends after 3 elements without its closing ']'" in load.errors[0][1]


@pytest.mark.parametrize("chunk", [5, 64, 1 << 20])
def test_json_array_is_read_in_chunks(tmp_path, chunk):
    """Elements straddling chunk boundaries decode the same; a cut file still reports its truncation."""
    from data_selection.pool import MalformedRecord, _iter_json_array

    rows = [{"instruction": f"question {i} é", "output": "x" * (i * 7)} for i in range(1, 12)]
    text = json.dumps(rows)
    with (tmp_path / "a.json").open("w") as fh:
        fh.write(text)
    with (tmp_path / "a.json").open() as fh:
        assert [r for _, r in _iter_json_array(fh, "a.json", chunk_chars=chunk)] == rows
    (tmp_path / "cut.json").write_text(text[:-10])
    with (tmp_path / "cut.json").open() as fh:
        got = [r for _, r in _iter_json_array(fh, "cut.json", chunk_chars=chunk)]
    assert got[:-1] == rows[:-1] and isinstance(got[-1], MalformedRecord) and "truncated" in str(got[-1])


def test_csv_parquet_and_datasets_folder(tmp_path):
    import datasets

    (tmp_path / "p.csv").write_text("instruction,input,output\nSay hi,,hi\nBroken,,\n")
    load = load_pool(tmp_path / "p.csv")
    assert [r.response for r in load.records] == ["hi"]
    assert load.errors == [("p.csv:3", "empty response")]
    ds = datasets.Dataset.from_list([{"instruction": "x", "input": "", "output": "y"},
                                     {"instruction": "z", "input": "", "output": "w"}])
    ds.to_parquet(str(tmp_path / "p.parquet"))
    assert [r.prompt for r in load_pool(tmp_path / "p.parquet").records] == ["x", "z"]
    ds.save_to_disk(str(tmp_path / "dsdir"))
    assert len(load_pool(tmp_path / "dsdir").records) == 2
    # A datasets folder inside a pool folder is read as one: its JSON files are metadata, not records.
    folder = tmp_path / "folder"
    ds.save_to_disk(str(folder / "a_saved"))
    (folder / "b.jsonl").write_text('{"instruction": "q", "output": "r"}\n')
    load = load_pool(folder)
    assert [r.prompt for r in load.records] == ["x", "z", "q"] and not load.errors


def test_a_record_longer_than_the_reader_holds_is_not_read_whole(tmp_path, monkeypatch):
    """A 2 GB JSON line, array element or object was read into memory whole to be decoded (5-10x
    its size, in the API server checking an upload); so was a Parquet row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import data_selection.pool

    monkeypatch.setattr(data_selection.pool, "MAX_RECORD_CHARS", 1000)
    monkeypatch.setattr(data_selection.pool, "PARQUET_BATCH_ROWS", 1)
    good = '{"instruction": "a", "output": "b"}'
    long = '{"instruction": "' + "x" * 3000 + '", "output": "b"}'
    (tmp_path / "p.jsonl").write_text("\n".join([good, long, good, long]))  # the last line has no end
    load = load_pool(tmp_path / "p.jsonl")
    assert len(load.records) == 2 and load.errors == [(f"p.jsonl:{i}", "longer than 0 MiB") for i in (2, 4)]
    (tmp_path / "a.json").write_text(f"[{good}, {long}, {good}]")
    rows = list(data_selection.pool._iter_json_array(open(tmp_path / "a.json"), "a.json", chunk_chars=100))
    assert [str(r) for _, r in rows[1:]] == ["element 1 is longer than 0 MiB"] and rows[0][1]["output"] == "b"
    (tmp_path / "o.json").write_text('{"data": [' + ", ".join([good] * 40) + "]}")
    with pytest.raises(UserError, match="one JSON object of over 0 MiB; give a pool this large as JSON lines"):
        load_pool(tmp_path / "o.json")
    pq.write_table(pa.table({"instruction": ["x" * 3000], "output": ["b"]}), tmp_path / "p.parquet")
    with pytest.raises(UserError, match="row group 0 holds more than 0 MiB per row"):
        load_pool(tmp_path / "p.parquet")


def test_json_python_refuses_is_a_malformed_record_or_a_user_error(tmp_path):
    good = '{"instruction": "a", "output": "b"}'
    big = '{"instruction": ' + "9" * 5000 + ', "output": "b"}'  # over int()'s 4,300 digits
    deep = "[" * 5000 + "]" * 5000  # deeper than the decoder recurses
    (tmp_path / "p.jsonl").write_text("\n".join([good, big, deep, good]) + "\n")
    load = load_pool(tmp_path / "p.jsonl")
    assert len(load.records) == 2 and [where for where, _ in load.errors] == ["p.jsonl:2", "p.jsonl:3"]
    assert "nested too deeply" in load.errors[1][1]
    (tmp_path / "a.json").write_text(f"[{good}, {big}, {good}]")
    load = load_pool(tmp_path / "a.json")  # no resync after an element the decoder refuses
    assert len(load.records) == 1 and load.errors[0][0] == "a.json[1]"
    (tmp_path / "o.json").write_text('{"data": ' + deep + "}")
    with pytest.raises(UserError, match="nested too deeply"):
        load_pool(tmp_path / "o.json")
    # A field over the csv module's default limit (128 KiB) is a record like a long JSONL line.
    (tmp_path / "c.csv").write_text("instruction,output\nhi," + "x" * 200_000 + "\nok,fine\n")
    assert [len(r.response) for r in load_pool(tmp_path / "c.csv").records] == [200_000, 4]


def test_pools_in_other_encodings_are_reported_not_garbled(tmp_path):
    """A byte-order mark is dropped; Latin-1 bytes make their record malformed instead of training on
    U+FFFD; UTF-16 is refused by name; NaN and Infinity are not text."""
    rows = [{"instruction": "Café crème?", "output": "Oui."}, {"instruction": "Plain", "output": "ascii"}]
    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    (tmp_path / "latin1.jsonl").write_bytes(lines.encode("latin-1"))
    load = load_pool(tmp_path / "latin1.jsonl")
    assert [r.prompt for r in load.records] == ["Plain"]
    assert load.errors == [("latin1.jsonl:1", "'instruction' is not UTF-8 text (Latin-1 or another encoding?); "
                                              "save the pool as UTF-8")]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfinstruction,output\nCaf\xc3\xa9?,Oui.\n")
    assert [r.prompt for r in load_pool(tmp_path / "bom.jsonl").records] == ["Café crème?", "Plain"]
    assert [r.prompt for r in load_pool(tmp_path / "bom.csv").records] == ["Café?"]
    (tmp_path / "u16.jsonl").write_bytes(lines.encode("utf-16"))
    with pytest.raises(UserError, match="u16.jsonl is UTF-16 or UTF-32 text; save it as UTF-8"):
        load_pool(tmp_path / "u16.jsonl")
    (tmp_path / "n.jsonl").write_text('{"instruction": "a", "output": NaN}\n{"instruction": "b", "output": 12}\n'
                                      '{"instruction": "c", "output": -Infinity}\n')
    load = load_pool(tmp_path / "n.jsonl")
    assert [r.response for r in load.records] == ["12"] and [e[1] for e in load.errors] == [
        "'output' is nan, expected text", "'output' is -inf, expected text"]
    # An id in Latin-1 is only a label: the record stays and its id is written out escaped.
    (tmp_path / "id.jsonl").write_bytes(b'{"id": "r\xe9c", "instruction": "a", "output": "b"}\n')
    (record,) = load_pool(tmp_path / "id.jsonl").records
    assert record.source_id == "id.jsonl:1#r\\udce9c"
    json.dumps(record.to_dict(), ensure_ascii=False).encode("utf-8")


def test_pool_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="pool not found"):
        load_pool(tmp_path / "missing.jsonl")
    os.mkfifo(tmp_path / "fifo.jsonl")  # no writer: opening it would wait for ever
    with pytest.raises(UserError, match="not a regular file or folder"):
        load_pool(tmp_path / "fifo.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="unsupported type"):
        load_pool(tmp_path / "x.txt")
    (tmp_path / "bad.jsonl").write_text("{}\n[]\n")
    with pytest.raises(UserError, match="no usable records"):
        load_pool(tmp_path / "bad.jsonl")


def test_format_example_alpaca_and_chat_template(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rec = Record("Say hi", "hi", "s")
    prompt, response = format_example(tok, rec)
    assert prompt.endswith("### Response:\n") and "Say hi" in prompt and response == "hi" + tok.eos_token
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    prompt, response = format_example(tok, rec)
    assert prompt == "<|user|>Say hi\n<|assistant|>" and response == "hi\n"


def test_a_chat_template_that_never_ends_is_stopped(tiny_llama, monkeypatch):
    """Nested loops in a model's chat template rendered for ever (150 MB/s) in the sandbox."""
    import signal
    import time

    from transformers import AutoTokenizer

    import data_selection.pool

    monkeypatch.setattr(data_selection.pool, "TEMPLATE_SECONDS", 0.5)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
    t = time.perf_counter()
    with pytest.raises(UserError, match="chat template took over 0.5 s to render one record"):
        format_example(tok, Record("Say hi", "hi", "s"))
    assert time.perf_counter() - t < 5
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and signal.getsignal(signal.SIGALRM) in (
        signal.SIG_DFL, None)


def test_budget_resolution():
    assert resolve_budget(0.2, 200) == 40
    assert resolve_budget(37, 200) == 37
    assert resolve_budget(500, 200) == 200
    assert resolve_budget(1.0, 200) == 200
    for bad in (0, -1, float("nan")):
        with pytest.raises(UserError, match="budget must be > 0"):
            resolve_budget(bad, 200)
    with pytest.raises(UserError, match="whole"):
        resolve_budget(2.5, 200)


def test_allocation_is_proportional_capped_and_exact():
    n = allocate_budget(np.array([3.0, 1.0]), np.array([100, 100]), 40)
    assert n.tolist() == [30, 10]
    # The most degraded cluster is small: it gives all it has, the rest is shared by score.
    n = allocate_budget(np.array([10.0, 1.0, 3.0]), np.array([5, 50, 50]), 30)
    assert n.tolist() == [5, 6, 19] and n.sum() == 30
    for seed in range(20):
        rng = np.random.default_rng(seed)
        caps = rng.integers(0, 30, 7)
        budget = int(rng.integers(1, 250))
        n = allocate_budget(rng.random(7) * (rng.random(7) > 0.3), caps, budget)
        assert n.sum() == min(budget, caps.sum()) and np.all(n <= caps) and np.all(n >= 0)
    assert allocate_budget(np.zeros(3), np.array([10, 20, 30]), 12).tolist() == [2, 4, 6]


def test_conflict_graph_rejects_contradictions_only():
    graph = ConceptGraph()
    accepted = [Record("What is the capital of France?", "Paris is the capital of France.", "a"),
                Record("Is the Earth flat?", "No, the Earth is not flat.", "b"),
                Record("What is the capital of Germany?", "Berlin.", "c"),
                Record("What is the capital of France?", "It is Paris.", "d"),
                Record("Write a story about France", "Once upon a time " + "in a land far away, " * 10, "e")]
    for rec in accepted:
        assert graph.check(rec) is None, rec
        graph.add(rec)
    assert graph.check(Record("What is the capital of France?", "The capital of France is Lyon.", "x"))
    assert graph.check(Record("Is the Earth flat?", "Yes, the Earth is flat.", "y"))


def test_conflict_graph_tells_apart_questions_in_other_scripts_and_by_one_digit():
    """Non-Latin words and single digits are concepts: these questions are all different, so
    nothing is rejected (before, they reduced to the same empty or near-empty question)."""
    graph = ConceptGraph()
    people = ["Пушкин", "Толстой", "Чехов", "Гоголь", "Тургенев", "Достоевский"]
    records = [Record(f"В каком году родился {p}?", str(1799 + 10 * i), f"ru{i}") for i, p in enumerate(people)]
    records += [Record(f"What is {a} times {b}?", str(a * b), f"m{a}{b}") for a in range(2, 6) for b in range(2, 6)]
    records += [Record("?!", "42", "empty1"), Record("...", "7", "empty2")]  # no question words at all
    _all_kept_then_refused(graph, records, [Record("В каком году родился Пушкин?", "1850", "x"),  # another year
                                            Record("What is 3 times 4?", "13", "y")])


def _all_kept_then_refused(graph, consistent, contradicting):
    for rec in consistent:
        assert graph.check(rec) is None, rec
        graph.add(rec)
    for rec in contradicting:
        assert graph.check(rec), rec


def test_conflict_graph_keeps_different_questions_apart():
    """Operators, word order, scripts without spaces and a "no" to another question: all consistent."""
    graph = ConceptGraph()
    records = [Record("What is 3 + 5?", "8", "a"), Record("What is 3 - 5?", "-2", "b"),
               Record("What is 3 * 5?", "15", "c"), Record("What is 5 / 3?", "About 1.67", "d"),
               Record("Compute 12 + 30.", "42", "e"), Record("Compute 12 x 30.", "360", "f"),
               Record("Convert 5 km to miles", "3.1 miles", "g"), Record("Convert 5 miles to km", "8 km", "h"),
               Record("法国的首都是什么？", "巴黎。", "i"), Record("法国的首都是什么？", "巴黎是法国的首都。", "j"),
               Record("Is Paris in France?", "Yes, Paris is in France.", "k"),
               Record("Is Paris in Germany?", "No, Paris is not in Germany.", "l"),
               Record("Is the sky blue?", "Yes, the sky is blue.", "m"),
               Record("Is grass blue?", "No, grass is not blue.", "n")]
    _all_kept_then_refused(graph, records, [Record("法国的首都是什么？", "里昂。", "x"),  # another city
                                            Record("Is Paris in Germany?", "Yes, Paris is in Germany.", "y")])


def test_conflict_graph_stays_small_for_a_book_length_prompt():
    graph = ConceptGraph()
    words = " ".join(f"word{i} topic{i % 997}" for i in range(20_000))  # ~40,000 distinct phrases
    prompt = words + " What is the capital of France?"
    graph.add(Record(prompt, "Paris is the capital.", "long"))
    (question,) = graph.answers
    assert len(question) <= 2 * graph.question_words  # the prompt's last words only
    assert graph.check(Record(prompt, "Paris is not the capital.", "x"))  # still read


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from llm_prune.cli import main

    pool = tmp_path / "pool"
    pool.mkdir()
    cases = [
        ([str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o"), "--method", "random"], "pool not found"),
        ([str(pool), "-o", str(tmp_path / "o"), "--budget", "0", "--method", "random"], "--budget must be > 0"),
        ([str(pool), "-o", str(tmp_path / "o"), "--budget", "-3", "--method", "random"], "--budget must be > 0"),
        ([str(pool), "-o", str(tmp_path / "o")], "needs --original and --pruned"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["select", *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2, err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_select_output_takes_an_earlier_selection_only(tmp_path, capsys, monkeypatch):
    """Selecting again into a selection's folder replaces it; a folder of other files is refused
    untouched, and a selection that fails midway leaves the earlier one whole."""
    from llm_prune.cli import main

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(6)))

    def select(out, *extra):
        with pytest.raises(SystemExit) as exc:
            main(["select", str(pool), "--method", "random", "--budget", "3", "-o", str(out), *extra])
        return exc.value.code, capsys.readouterr().err

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text('{"my": "results"}')
    code, err = select(mine)
    assert code == 2 and "holds other files" in err and err.count("\n") == 1, err
    assert (mine / "report.json").read_text() == '{"my": "results"}' and len(list(mine.iterdir())) == 1
    out = tmp_path / "sel"
    assert select(out)[0] == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert select(out, "--seed", "1")[0] == 0  # an earlier selection: replaced
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    import data_selection.report

    monkeypatch.setattr(data_selection.report, "plot_report", lambda *a: (_ for _ in ()).throw(OSError(28, "full")))
    code, err = select(out)
    assert code == 1 and err.startswith("error: no space left on the disk") and err.count("\n") == 1, err
    after = {f.name: f.read_bytes() for f in out.iterdir()}
    assert after == before  # the earlier selection, whole, and no partial file
