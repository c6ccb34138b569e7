"""A real Ray head for tests: free ports on 127.0.0.1, its own --temp-dir and auth token, stopped by
ending only its own processes (``ray stop`` would stop every Ray of the user on the machine)."""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")


@dataclass
class Head:
    dashboard: str          # http://127.0.0.1:PORT, the job submission address
    temp_dir: Path
    env: dict               # the environment a client needs: token auth on, this head's token file


def start_head(tmp: Path, *, num_cpus: int = 2, wait: bool = True):
    """``ray start --head`` with token auth and the dashboard on 127.0.0.1. The token is written to a
    0600 file and reaches every client through RAY_AUTH_TOKEN_PATH — never on a command line.
    With ``wait=False`` returns (Head, Popen) so the caller can work while the head boots."""
    tmp.mkdir(parents=True, exist_ok=True)
    token_file = tmp / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_ADDRESS": "", "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    env.pop("RAY_AUTH_TOKEN", None)
    port, dash = free_port(), free_port()
    # Short: Ray's socket paths live under it and AF_UNIX paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="lc-ray-", dir="/tmp"))
    proc = subprocess.Popen([ray_bin(), "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
                             # Own agent ports: the defaults (e.g. 52365) are taken by any other Ray on the
                             # machine (the suite's session cluster), and then jobs find "No available agent".
                             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                             f"--ray-client-server-port={free_port()}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    head = Head(f"http://127.0.0.1:{dash}", temp_dir, env)
    if not wait:
        return head, proc
    wait_started(proc)
    return head


def submit_job(head: "Head", args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit --address HEAD ARGS…`, retried while the freshly started head answers
    "No available agent to submit job" (its job agent comes up after `ray start` returns)."""
    import time

    deadline = time.monotonic() + 180
    while True:
        try:
            proc = subprocess.run([ray_bin(), "job", "submit", "--address", head.dashboard, *args], env=head.env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(f"ray job submit did not return in {timeout:.0f} s\n{job_diagnostics(head, args, err)}") \
                from None
        if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            return proc
        time.sleep(3)


def job_diagnostics(head: "Head", args: list[str], err: subprocess.TimeoutExpired) -> str:
    """What a job that did not end was doing: the submit's own output, the job's log, the cluster's
    resources and placement groups (a hang that waits for CPUs shows there)."""
    def text(b) -> str:
        return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

    parts = [f"--- submit output (tail)\n{(text(err.stdout) + text(err.stderr))[-3000:]}"]
    sid = args[args.index("--submission-id") + 1] if "--submission-id" in args else None
    cmds = []
    if sid:
        cmds.append(["job", "logs", "--address", head.dashboard, sid])
    cmds += [["list", "placement-groups", "--address", head.dashboard, "--detail"],
             ["list", "actors", "--address", head.dashboard, "--filter", "state=ALIVE"]]
    for cmd in cmds:
        try:
            r = subprocess.run([ray_bin(), *cmd], env=head.env, capture_output=True, text=True, timeout=60)
            parts.append(f"--- ray {' '.join(cmd[:2])} (tail)\n{(r.stdout + r.stderr)[-4000:]}")
        except subprocess.TimeoutExpired:
            parts.append(f"--- ray {' '.join(cmd[:2])}: no answer in 60 s")
    return "\n".join(parts)


def wait_started(proc: subprocess.Popen, timeout: float = 240) -> None:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out[-3000:]}")


def stop_head(temp_dir: Path, remove: bool = True) -> None:
    """Stop only the head started with this --temp-dir (every process whose command line names it),
    then delete the directory (``remove``)."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if remove:
        shutil.rmtree(temp_dir, ignore_errors=True)
