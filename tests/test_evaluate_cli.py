"""`llm-prune eval` on a tiny model directory."""

import json

import pytest

from llm_prune.cli import main
from tests.tiny_models import CORPUS


def _run(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_eval_ppl_json_and_record(tiny_llama, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(CORPUS * 6))
    out_file = tmp_path / "res.json"
    code, out, _ = _run(capsys, ["eval", str(tiny_llama), "--ppl", str(text), "--seq-len", "16,32",
                                 "--max-windows", "3", "--json", "--output", str(out_file)])
    assert code == 0
    results = json.loads(out)
    assert results["ppl"]["windows"] == 3 and set(results["ppl_by_seq_len"]) == {"16", "32"}
    assert json.loads(out_file.read_text())["ppl"] == results["ppl"]

    code, out, _ = _run(capsys, ["eval", str(tiny_llama), "--ppl", str(text), "--seq-len", "16", "--quiet",
                                 "--compare", str(tiny_llama)])
    assert code == 0 and "ppl@16" in out and "1.000" in out  # the same model compared with itself


def test_eval_missing_file_is_one_line_error(tiny_llama, tmp_path, capsys):
    code, out, err = _run(capsys, ["eval", str(tiny_llama), "--ppl", str(tmp_path / "nope.txt")])
    assert code == 2 and err.strip().startswith("error: perplexity text file not found")
    assert len(err.strip().splitlines()) == 1

    code, _, err = _run(capsys, ["eval", str(tiny_llama), "--tasks", "piqa,nope"])
    assert code == 2 and "unknown task 'nope'" in err
