"""A chat or server waiting for input uses (almost) no CPU: the kernels' thread team sleeps between calls.

Each test starts the real program on the default model, lets it answer once, then samples the process's CPU time
(utime + stime from /proc) over 3 s of waiting: below 2% of one core."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU time from /proc (Linux)")
WAIT_S = 3.0
IDLE_LIMIT = 0.02  # of one core


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, in clock ticks


def idle_fraction(pid: int) -> float:
    time.sleep(1.0)  # threads that spin a little after the last call have gone to sleep
    before = cpu_seconds(pid)
    time.sleep(WAIT_S)
    return (cpu_seconds(pid) - before) / WAIT_S


def test_chat_waiting_for_input_is_idle(smollm2_gguf):
    proc = subprocess.Popen([sys.executable, "-m", "tinychat", "chat", "--temperature", "0", "--max-new-tokens", "8"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        proc.stdin.write(b"Hi\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip()  # the answer came: the threads have run
        assert idle_fraction(proc.pid) < IDLE_LIMIT
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_server_waiting_for_requests_is_idle(smollm2_gguf, tmp_path, start_server):
    with start_server(smollm2_gguf, tmp_path / "serve.log") as (base, proc):
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300).status_code == 200
        assert idle_fraction(proc.pid) < IDLE_LIMIT
