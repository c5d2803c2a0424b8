"""Jobs under repeated `kill -9`: of job processes (what the OOM killer does) and of the server.

Starts `llm-prune serve` (embedded worker, SQLite store) on a tiny random Llama, submits N jobs
(prune 25%, LoRA recovery for --steps steps, a small evaluation), then, every few seconds until
the kill budget is spent, SIGKILLs either the process of a running job or the whole server
(restarted at once on the same data directory). Every checkpoint the API lists is remembered
with its archive sha256. At the end it reports:

- jobs lost: submitted jobs that are missing or did not succeed (target 0),
- finished checkpoints lost: a checkpoint once listed that is gone or has other bytes (target 0),
- jobs retried: jobs that needed more than one attempt, and the attempts in all,
- time to recover after a server kill: until the API answers, and until a job runs again.

    .venv/bin/python bench/service_faults.py --jobs 6 --job-kills 6 --server-kills 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.client import Client  # noqa: E402
from service.launch import Server  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled")


def _pid(data: Path, job_id: str) -> tuple[int, int] | None:
    try:
        info = json.loads((data / "jobs" / job_id / "process.json").read_text())
    except (OSError, ValueError):
        return None
    return info["pid"], info["attempt"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _body(model: str, pool: str, steps: int) -> dict:
    return {"model": model, "budget": {"ratio": 0.25},
            "pruning": {"calibration_samples": 2, "calibration_seq_len": 16, "skip_first": 0, "skip_last": 0},
            "data": {"file_id": pool, "selection": "random", "budget": 1.0},
            "recovery": {"method": "lora", "max_steps": steps, "micro_batch_size": 1, "cutoff_len": 32},
            "evaluation": {"seq_len": 16, "max_windows": 2}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=40, help="LoRA steps per job")
    ap.add_argument("--job-kills", type=int, default=6)
    ap.add_argument("--server-kills", type=int, default=2)
    ap.add_argument("--every", type=float, nargs=2, default=(4.0, 9.0), help="seconds between kills (range)")
    ap.add_argument("--max-attempts", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    from tests.tiny_models import build_model

    root = Path(tempfile.mkdtemp(prefix="llm-prune-faults-"))
    data = root / "data"
    model = str(build_model(root / "models" / "tiny", "llama"))
    env = {"LLM_PRUNE_ALLOWED_MODEL_ROOTS": str(root / "models"), "LLM_PRUNE_NO_AUTH": "1",
           "LLM_PRUNE_LEASE_SECONDS": "3", "LLM_PRUNE_HEARTBEAT_SECONDS": "0.5", "LLM_PRUNE_POLL_SECONDS": "0.3",
           "LLM_PRUNE_MAX_ATTEMPTS": str(args.max_attempts), "LLM_PRUNE_MAX_ACTIVE_JOBS_PER_KEY": "1000",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = root / "server.log"
    server = Server(data, env=env, extra_args=["--no-auth"], log=log).start()
    port = server.port
    client = Client(server.url, api_key="")
    lines = "".join(f'{{"instruction": "Count to {i}.", "output": "{" ".join(map(str, range(i % 9 + 1)))}"}}\n'
                    for i in range(64))
    pool = client.http.post("/v1/files", files={"file": ("pool.jsonl", lines.encode())},
                            data={"purpose": "recovery"}).json()["id"]
    ids = [client.submit(_body(model, pool, args.steps))["id"] for _ in range(args.jobs)]
    t0 = time.monotonic()
    seen: dict[tuple[str, str], str] = {}  # (job, checkpoint) -> archive sha256
    job_kills = server_kills = 0
    api_back, work_back = [], []
    next_kill = time.monotonic() + rng.uniform(*args.every)

    def observe() -> list[dict]:
        jobs = [client.job(i) for i in ids]
        for job in jobs:
            for c in client.checkpoints(job["id"]):
                seen.setdefault((job["id"], c["name"]), c["archive_sha256"])
        return jobs

    while time.monotonic() - t0 < args.timeout:
        jobs = observe()
        if all(j["status"] in TERMINAL for j in jobs):
            break
        running = [j["id"] for j in jobs if j["status"] == "running"]
        if time.monotonic() >= next_kill and (job_kills < args.job_kills or server_kills < args.server_kills):
            procs = [(i, p) for i in running if (p := _pid(data, i)) and _alive(p[0])]
            kill_server = server_kills < args.server_kills and (job_kills >= args.job_kills or rng.random() < 0.3)
            if kill_server:
                before = {i: _pid(data, i) for i in ids}
                server.kill()
                server_kills += 1
                t_kill = time.monotonic()
                server = Server(data, port=port, env=env, extra_args=["--no-auth"], log=log).start()
                api_back.append(time.monotonic() - t_kill)
                # Work is back once some job runs in a new, live process (or nothing was left).
                while time.monotonic() - t_kill < 120:
                    now = {i: _pid(data, i) for i in ids}
                    if any(p and p != before[i] and _alive(p[0]) for i, p in now.items()) or \
                            all(j["status"] in TERMINAL for j in observe()):
                        break
                    time.sleep(0.2)
                work_back.append(time.monotonic() - t_kill)
                print(f"{time.monotonic() - t0:6.1f}s  kill -9 server: API back in {api_back[-1]:.1f} s, "
                      f"a job running again in {work_back[-1]:.1f} s", flush=True)
            elif procs:
                job_id, (pid, attempt) = rng.choice(procs)
                os.kill(pid, signal.SIGKILL)
                job_kills += 1
                print(f"{time.monotonic() - t0:6.1f}s  kill -9 job process {pid} ({job_id}, attempt {attempt})",
                      flush=True)
            next_kill = time.monotonic() + rng.uniform(*args.every)
        time.sleep(0.5)
    elapsed = time.monotonic() - t0

    jobs = observe()
    listed = {j["id"] for j in client.list_jobs(limit=100)["data"]}
    lost_jobs = [j["id"] for j in jobs if j["status"] != "succeeded" or j["id"] not in listed]
    now = {(j["id"], c["name"]): c["archive_sha256"] for j in jobs for c in client.checkpoints(j["id"])}
    lost_ckpts = [k for k, sha in seen.items() if now.get(k) != sha]
    retried = [j for j in jobs if j["attempts"] > 1]
    messages = [e["message"] for j in jobs for e in client.events(j["id"], limit=1000)["data"]]
    server.stop()
    report = {
        "jobs": args.jobs, "lora_steps_per_job": args.steps, "job_process_kills": job_kills,
        "server_kills": server_kills, "jobs_lost": len(lost_jobs), "lost": lost_jobs,
        "finished_checkpoints_seen": len(seen), "finished_checkpoints_lost": len(lost_ckpts),
        "jobs_retried": len(retried), "attempts_total": sum(j["attempts"] for j in jobs),
        "retry_events": sum("retrying" in m or "requeued" in m for m in messages),
        "api_back_s": [round(x, 1) for x in api_back], "job_running_again_s": [round(x, 1) for x in work_back],
        "median_job_running_again_s": round(statistics.median(work_back), 1) if work_back else None,
        "wall_s": round(elapsed, 1), "statuses": {j["id"]: j["status"] for j in jobs},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU", "store": "SQLite (WAL)",
    }
    print(json.dumps(report, indent=2))
    if lost_jobs or lost_ckpts:
        print(f"server log: {log}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
