"""Runs `ragcache` commands in forked children and signals them, for the crash and Ctrl-C tests.

Importing torch and transformers takes seconds; killing ten fresh `python -m ragcache.cli index`
processes would spend most of the test on imports. This process imports ragcache once and, for each
command, forks a child that runs the real CLI entry point from the start (the model loads, the index
opens, the writer lock is taken) with its own stdout and stderr files. The parent never runs torch,
so the children fork from a process with no thread pools in use.

One JSON request per stdin line, one JSON reply per stdout line:
  {"start": [args...], "out": path, "err": path, "batch_chunks": n | null}   -> {"pid": pid}
      (batch_chunks: the child commits n chunks at a time instead of indexer.BATCH_CHUNKS)
  {"signal": n | null, "pid": pid, "ready": path | null, "size": bytes, "delay": s}
      wait until the child has written `ready` and it holds at least `size` bytes (default 1), then
      `delay` seconds, then send signal n unless the child has ended; wait for it
      -> {"code", "signalled", "ready_s", "total_s"}
"""

import json
import os
import signal
import sys
import time

from ragcache import indexer
from ragcache.cli import app


def start(args: list[str], out: str, err: str, batch_chunks: int | None) -> int:
    pid = os.fork()
    if pid:
        return pid
    if batch_chunks:
        indexer.BATCH_CHUNKS = batch_chunks
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in any Python, even if our starter ignored it
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    code = 0
    try:
        app(args, prog_name="ragcache")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def finish(pid: int, started: float, sig: int | None, ready: str | None, size: int, delay: float) -> dict:
    def ended() -> int | None:
        done, status = os.waitpid(pid, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if done else None

    code, ready_s = None, None
    while code is None and ready and ready_s is None:
        try:
            stat = os.stat(ready)
            if stat.st_size >= size and stat.st_mtime >= started - 0.02:  # the file clock is coarse
                ready_s = time.time() - started
        except FileNotFoundError:
            pass
        code = ended()
        time.sleep(0.005)
    deadline = time.monotonic() + delay
    while code is None and time.monotonic() < deadline:
        code = ended()
        time.sleep(0.002)
    signalled = code is None and sig is not None
    if signalled:
        os.kill(pid, sig)
    if code is None:
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return {"code": code, "signalled": signalled, "ready_s": ready_s, "total_s": time.time() - started}


def main() -> None:
    started: dict[int, float] = {}
    for line in sys.stdin:
        req = json.loads(line)
        if "start" in req:
            t = time.time()
            pid = start(req["start"], req["out"], req["err"], req.get("batch_chunks"))
            started[pid] = t
            reply = {"pid": pid}
        else:
            reply = finish(req["pid"], started.pop(req["pid"]), req.get("signal"), req.get("ready"),
                           req.get("size", 1), req.get("delay", 0))
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
