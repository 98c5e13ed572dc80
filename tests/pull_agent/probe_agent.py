"""A shell-free test agent for the pull daemon's tests.

``python probe_agent.py PROMPT_FILE``: the prompt is JSON ``{"sleep": seconds, "exit": code}``.
It appends one JSON line when it starts and one when it ends to ``$PROBE_DIR/<task id>.jsonl``
(time, pid, parent pid), prints a line about every 0.3 s while it works, and exits with the
given code. Killed, it writes no end line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def record(event: str) -> None:
    path = Path(os.environ["PROBE_DIR"]) / f"{os.environ['FLEET_TASK_ID']}.jsonl"
    line = json.dumps({"event": event, "at": time.time(), "pid": os.getpid(), "ppid": os.getppid()})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def main() -> int:
    text = Path(sys.argv[1]).read_text(encoding="utf-8").strip()
    spec = json.loads(text) if text.startswith("{") else {}
    record("start")
    print(f"probe: started as pid {os.getpid()}", flush=True)
    deadline = time.monotonic() + float(spec.get("sleep", 0))
    while (left := deadline - time.monotonic()) > 0:
        print("probe: working", flush=True)
        time.sleep(min(0.3, left))
    record("end")
    print("probe: done", flush=True)
    return int(spec.get("exit", 0))


if __name__ == "__main__":
    sys.exit(main())
