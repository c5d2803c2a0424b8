"""Worker pieces that need no pipeline run: progress folding, exit reasons, the runner's report
protocol, and the reproducible checkpoint archive."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile

from service import artifacts
from service.worker import PIPELINE_STAGES, JobProgress, _exit_reason


def test_progress_folds_stages_steps_and_metrics():
    p = JobProgress()
    assert p.fold({"kind": "stage_start", "stage": "load"})
    assert p.fold({"kind": "stage_end", "stage": "load"})
    assert p.progress == 1 / PIPELINE_STAGES
    p.fold({"kind": "stage_start", "stage": "recover"})
    kept = [p.fold({"kind": "progress", "stage": "recover", "step": i, "total": 100, "metrics": {"loss": 1 / i}})
            for i in range(1, 101)]
    assert kept[0] and kept[-1] and sum(kept) < 10  # steps are thinned, the last one always kept
    assert p.progress == 2 / PIPELINE_STAGES and p.metrics["recover"]["loss"] == 0.01
    assert p.fields()["stage"] == "recover" and p.fields()["stages_done"] == 1
    assert p.fold({"kind": "warning", "stage": "recover", "message": "x"})


def test_exit_reasons():
    assert "SIGKILL" in _exit_reason(-signal.SIGKILL) and "out of memory" in _exit_reason(-signal.SIGKILL)
    assert "SIGSEGV" in _exit_reason(-signal.SIGSEGV)
    assert "status 3" in _exit_reason(3)


def test_runner_reports_a_bad_recipe_as_user_error(tmp_path):
    (tmp_path / "recipe.json").write_text(json.dumps({"model": "m", "budget": {"ratio": 2}}))
    proc = subprocess.run([sys.executable, "-m", "service.runner", str(tmp_path), "--parent-pid", str(os.getpid())],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stdout.splitlines()
    msg = json.loads(line)
    assert msg["type"] == "error" and msg["user"] and msg["param"] == "budget.ratio"


def test_runner_exits_when_its_parent_is_gone(tmp_path):
    (tmp_path / "recipe.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "service.runner", str(tmp_path), "--parent-pid", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 137 and proc.stdout == ""


def test_archive_is_reproducible_and_matches_manifest(tmp_path):
    root = tmp_path / "run" / "final"
    root.mkdir(parents=True)
    (root / "config.json").write_text("{}")
    (root / "model.safetensors").write_bytes(os.urandom(3000))
    (root / "sub").mkdir()
    (root / "sub" / "x.txt").write_text("x" * 513)
    (root / ".done").write_text("")
    m = artifacts.build_manifest(tmp_path, "final")
    assert [f["name"] for f in m["files"]] == ["config.json", "model.safetensors", "sub/x.txt"]
    first = b"".join(artifacts.stream_tar(root, "final", [f["name"] for f in m["files"]]))
    os.utime(root / "model.safetensors", (0, 12345))  # timestamps do not enter the archive
    second = b"".join(artifacts.stream_tar(root, "final", [f["name"] for f in m["files"]]))
    assert first == second and len(first) == m["archive_bytes"] and len(first) % tarfile.RECORDSIZE == 0
    assert hashlib.sha256(first).hexdigest() == m["archive_sha256"]
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        assert tar.extractfile("final/sub/x.txt").read() == b"x" * 513
    assert artifacts.build_manifest(tmp_path, "pruned") is None
