"""A test agent for the end-to-end tests: the demo agent, with a visible process tree.

``python agent_script.py PROMPT_FILE`` prints ``e2e-pid=<pid> e2e-child=<pid>`` (its own pid
and, with ``E2E_CHILD=1``, a child's that sleeps in the same process group), appends
``start``/``end`` lines with timestamps to ``$E2E_JOURNAL`` when set, then does the demo
agent's work in this same process. A line ``e2e-sleep=SECONDS`` in the prompt slows it down
(as ``FLEET_DEMO_SLEEP`` does); ``e2e-first-sleep=SECONDS`` does so instead on the task's first
start in the journal. Run as a direct child of the worker, its pid is the agent subprocess's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def _journal(event: str) -> None:
    path = os.environ.get("E2E_JOURNAL")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{event} {os.getpid()} {time.time():.6f} {os.environ.get('FLEET_TASK_ID')}\n")


def _started_before() -> bool:
    path, task_id = os.environ.get("E2E_JOURNAL"), os.environ.get("FLEET_TASK_ID")
    if not path or not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as fh:
        return any(line.startswith("start ") and line.split()[3] == task_id for line in fh)


def _sleep_from_prompt(prompt_file: str) -> None:
    with open(prompt_file, encoding="utf-8") as fh:
        settings = dict(line.strip().split("=", 1) for line in fh if line.startswith("e2e-"))
    sleep = settings.get("e2e-sleep")
    if "e2e-first-sleep" in settings and not _started_before():
        sleep = settings["e2e-first-sleep"]
    if sleep is not None:
        os.environ["FLEET_DEMO_SLEEP"] = sleep


def main() -> int:
    if len(sys.argv) == 2:
        _sleep_from_prompt(sys.argv[1])
    child = None
    if os.environ.get("E2E_CHILD") == "1":
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    print(f"e2e-pid={os.getpid()} e2e-child={child.pid if child else 0}", flush=True)
    _journal("start")
    from fleet_worker.demo_agent import main as demo

    code = demo(sys.argv[1:])
    _journal("end")
    if child is not None:
        child.kill()
        child.wait()
    return code


if __name__ == "__main__":
    sys.exit(main())
