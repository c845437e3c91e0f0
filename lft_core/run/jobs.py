"""Long work (cache, train, eval, recoupling) as background subprocesses of the CLI, with progress files.

A job lives in ``cache/jobs/<id>/``::

    job.json         what was asked: kind, CLI arguments, label, created, pid of the runner
    progress.jsonl   one JSON event per line, appended by the command (training: step, loss, ...; a sweep: run
                     ``step`` of ``steps``, its flow ``label``, ``flow_step`` of ``flow_steps``, loss, ...)
    log.txt          the command's stdout and stderr
    result.json      the command's --json output (written atomically at the end)
    exit_code        written by the runner when the command ends
    STOP             created by ``stop_job``; the command checks it before every step

The runner (``python -m lft_core.run.jobs <dir>``) starts the CLI as its child, waits, and writes ``exit_code``.
A job whose runner is gone without an ``exit_code`` (killed, machine rebooted) reads as ``failed``, never as
running forever. Jobs survive page reloads: the app only reads these files.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from lft_core.atomic import DamagedRecord, read_record, write_json, write_text
from lft_core.errors import LFTError
from lft_core.paths import REPO_ROOT, cache_dir

KINDS = ("cache", "train", "eval", "recoupling", "toy", "sweep", "demo", "compare", "baselines")
INTERNAL_FLAGS = ("--json", "--progress-file", "--stop-file")
"""Flags ``start_job`` adds for the job's own files; ``Job.command`` leaves them out."""


@dataclass
class Job:
    id: str
    dir: Path
    kind: str
    label: str
    args: list[str]
    created: str
    status: str  # "running" | "complete" | "failed" | "stopped" | "stopping" | "damaged"
    events: list[dict] = field(default_factory=list)
    result: dict | None = None
    exit_code: int | None = None

    @property
    def last(self) -> dict:
        return self.events[-1] if self.events else {}

    @property
    def command(self) -> str:
        """The shell command that reproduces the job: ``python -m lft_core <kind> <args>`` without the job's own
        files (``INTERNAL_FLAGS``)."""
        args, skip = [], False
        for arg in self.args:
            if skip:
                skip = False
            elif arg in INTERNAL_FLAGS:
                skip = True
            elif not arg.startswith(tuple(f + "=" for f in INTERNAL_FLAGS)):
                args.append(arg)
        return shlex.join(["python", "-m", "lft_core", *args])

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.dir / "log.txt").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def error_line(self) -> str | None:
        """The command's ``error: ...`` line, if it failed with one."""
        for line in reversed(self.log_tail(50).splitlines()):
            if line.startswith("error: "):
                return line[len("error: "):]
        return None


def jobs_dir() -> Path:
    return cache_dir("jobs")


def start_job(kind: str, cli_args: list[str], label: str = "") -> Job:
    """Start ``python -m lft_core <kind> <cli_args>`` in the background; returns at once."""
    if kind not in KINDS:
        raise LFTError(f"unknown job kind {kind!r}")
    job_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    d = jobs_dir() / job_id
    d.mkdir(parents=True)
    args = [kind, *cli_args, "--json", str(d / "result.json")]
    if kind in ("train", "sweep", "demo"):
        args += ["--progress-file", str(d / "progress.jsonl"), "--stop-file", str(d / "STOP")]
    elif kind == "compare":
        args += ["--progress-file", str(d / "progress.jsonl")]
    meta = {"id": job_id, "kind": kind, "label": label or " ".join(cli_args), "args": args,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "pid": None}
    write_json(d / "job.json", meta)
    with open(d / "log.txt", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lft_core.run.jobs", str(d)], cwd=str(REPO_ROOT),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    meta["pid"] = proc.pid
    write_json(d / "job.json", meta)
    return read_job(job_id)


def start_unique_job(kind: str, cli_args: list[str], label: str) -> Job:
    """The running job of ``kind`` and ``label`` (any session's), or a new one started: under one lock, so ten
    sessions asking for the same work at once start it once."""
    from filelock import FileLock

    with FileLock(str(jobs_dir() / ".start.lock")):
        return running_job(kind, label) or start_job(kind, cli_args, label)


def running_job(kind: str, label: str) -> Job | None:
    """The running (or stopping) job of ``kind`` with ``label``, any session's, or None."""
    return next((j for j in list_jobs(kind) if j.label == label and j.status in ("running", "stopping")), None)


def last_job(kind: str, label: str) -> Job | None:
    """The newest job of ``kind`` with ``label``, whatever its status, or None."""
    return next((j for j in list_jobs(kind) if j.label == label), None)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (finished, not yet reaped by its parent) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


JOB_FIELDS = {"kind": str, "args": list, "created": str}
EVENT_FIELDS = {"step": int, "steps": int, "loss": (int, float)}  # one training progress event
KIND_EVENT_FIELDS = {"sweep": {"step": int, "steps": int, "label": str}}  # run i of N: flow; others: EVENT_FIELDS
KIND_EVENT_FIELDS["demo"] = {"step": int, "steps": int}  # step i of N of the demo (lft_core.run.demo), label, eta_s
KIND_EVENT_FIELDS["compare"] = {"step": int, "steps": int}  # unit i of N of an evaluation, label, eta_s
RESULT_FIELDS = {"train": {"name": str, "final_loss": (int, float), "heldout_nmse": (int, float),
                           "seconds": (int, float), "device": str},
                 "sweep": {"sweep": str, "runs": list, "stopped": bool},
                 "demo": {"ready": bool, "stopped": bool, "steps": list}}


def read_job(job_id: str) -> Job:
    """A job as its files say; a damaged record (job.json unreadable, not an object, wrong field types) is
    returned with status "damaged" and the reason as its label, so listings go on; LFTError if there is none."""
    d = jobs_dir() / job_id
    if not d.is_dir():
        raise LFTError(f"job {job_id} not found")
    try:
        meta = read_record(d / "job.json", JOB_FIELDS)
    except DamagedRecord as e:
        return Job(job_id, d, "?", f"damaged job record: {e}", [], "", "damaged")
    events = []
    try:
        for line in (d / "progress.jsonl").read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line being written right now, or damaged
            if isinstance(event, dict) and all(isinstance(event.get(k), t) and not isinstance(event.get(k), bool)
                                               for k, t in KIND_EVENT_FIELDS.get(meta["kind"], EVENT_FIELDS).items()):
                events.append(event)
    except OSError:
        pass
    try:
        result = read_record(d / "result.json", RESULT_FIELDS.get(meta["kind"]))
    except DamagedRecord:
        result = None
    exit_code = None
    try:
        exit_code = int((d / "exit_code").read_text().strip())
    except (OSError, ValueError):
        pass
    if exit_code is not None:
        status = "complete" if exit_code == 0 else "failed"
        if exit_code == 0 and result and result.get("stopped"):
            status = "stopped"
    elif isinstance(meta.get("pid"), int) and _alive(meta["pid"]):
        status = "stopping" if (d / "STOP").exists() else "running"
    else:
        status = "failed"
    return Job(job_id, d, meta["kind"], str(meta.get("label", "")), [str(a) for a in meta["args"]], meta["created"],
               status, events, result, exit_code)


def list_jobs(kind: str | None = None) -> list[Job]:
    """Every job, newest first."""
    out = []
    for d in sorted(jobs_dir().iterdir(), reverse=True):
        if d.is_dir():
            try:
                job = read_job(d.name)
            except LFTError:
                continue
            if kind is None or job.kind == kind:
                out.append(job)
    return out


def stop_job(job_id: str, kill_after: float | None = None) -> None:
    """Ask a job to stop (it finishes its current step and checkpoints); optionally kill it after a delay."""
    d = jobs_dir() / job_id
    (d / "STOP").touch()
    if kill_after is not None:
        deadline = time.time() + kill_after
        try:
            pid = read_record(d / "job.json").get("pid")
        except DamagedRecord:
            return
        pid = pid if isinstance(pid, int) else None
        while time.time() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _die_with_parent(parent: int) -> None:
    """In the CLI child (Linux): ask the kernel for SIGKILL when the runner dies, so killing the runner alone
    does not leave an orphaned trainer holding the flow's lock."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the runner died before the request was made
        os._exit(1)


def _run(job_dir: Path) -> int:
    """The runner: run the job's CLI command as a child and record its exit code."""
    meta = read_record(job_dir / "job.json", JOB_FIELDS)
    code = subprocess.call([sys.executable, "-m", "lft_core", *meta["args"]], cwd=str(REPO_ROOT),
                           preexec_fn=(lambda parent=os.getpid(): _die_with_parent(parent))
                           if sys.platform.startswith("linux") else None)
    write_text(job_dir / "exit_code", str(code))
    return code


if __name__ == "__main__":
    sys.exit(_run(Path(sys.argv[1])))
