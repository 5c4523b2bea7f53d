"""The python tool's sandbox: bubblewrap (`bwrap`) around every call (docs/sandbox.md).

Code the policy writes is hostile: RL rewards whatever works, tampering with the trainer
included. Each call runs in fresh user, pid, network, ipc, uts and mount namespaces
(`--unshare-all`), in a new session, and dies with the trainer (`--die-with-parent`). It sees
read-only system directories and its Python, a private writable work dir (`/work`, deleted after
the call) and an empty `/tmp`; nothing of the trainer's files, home, environment or processes,
and no network but a loopback that is down. When the trainer runs as root the sandbox runs as
an unprivileged uid of its own (`UID_BASE` + a slot per concurrent call), which maps to no
privileged uid outside; otherwise as the trainer's uid inside its own user namespace. Inside,
resource limits bound each call: address space per process, processes and threads (RLIMIT_NPROC,
which the kernel counts per user namespace: the call's own tasks only), CPU time, file size
and open files; so all processes of a call together hold at most `max_processes` ×
`memory_bytes` of address space.

`available()` says whether bwrap works here (probed once); `command()` builds the bwrap command
line for a call.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

UID_BASE = 61000  # outside uids of sandboxed calls when the trainer is root: one per call
MAX_SLOTS = 256
WORKDIR = "/work"  # the call's work dir, as the sandbox sees it
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap), or set "
                "tools.python.sandbox=rlimits (limits only: NOT a sandbox)")

_slots_lock = threading.Lock()
_slots_used: set[int] = set()


def is_root() -> bool:
    return os.geteuid() == 0


@contextmanager
def call_identity() -> Iterator[Optional[int]]:
    """The outside uid (and gid) of one call: a free slot of the pool when root, else None (the
    trainer's own uid)."""
    if not is_root():
        yield None
        return
    with _slots_lock:
        slot = next((s for s in range(MAX_SLOTS) if s not in _slots_used), None)
        if slot is None:
            raise RuntimeError(f"more than {MAX_SLOTS} concurrent python tool calls")
        _slots_used.add(slot)
    try:
        yield UID_BASE + slot
    finally:
        with _slots_lock:
            _slots_used.discard(slot)


def _traversable_by_others(path: str) -> bool:
    """Whether a user other than the owner can reach `path` (every ancestor o+x)."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        directory = os.sep.join(parts[:i - 1]) or os.sep
        if not os.stat(directory).st_mode & 0o001:
            return False
    return os.access(path, os.R_OK)


@functools.cache
def interpreter() -> tuple[str, str]:
    """(python executable, its installation prefix) to run inside the sandbox: the trainer's own
    base interpreter, or, when the sandbox's uid cannot reach it (a Python under root's home),
    the system's /usr/bin/python3. Raises RuntimeError when there is none."""
    own = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    if not is_root() or _traversable_by_others(own):
        return own, os.path.realpath(sys.base_prefix)
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system and _traversable_by_others(system):
        return os.path.realpath(system), "/usr"
    raise RuntimeError(f"the sandbox's unprivileged uid cannot reach this Python ({own}) and "
                       f"there is no /usr/bin/python3")


def command(workdir: str, argv: list[str], env: dict[str, str]) -> list[str]:
    """The bwrap command line running `argv` (the interpreter first) in the sandbox, with
    `workdir` (on the host) as its `/work` and `env` as its whole environment."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise RuntimeError(f"bwrap not found: {INSTALL_HINT}")
    args = [bwrap, "--unshare-all", "--die-with-parent", "--new-session",
            "--hostname", "sandbox"]
    for directory in SYSTEM_DIRS:
        if os.path.islink(directory):  # merged /usr: /lib -> usr/lib
            args += ["--symlink", os.readlink(directory), directory]
        elif os.path.isdir(directory):
            args += ["--ro-bind", directory, directory]
    python, prefix = interpreter()
    if not any(prefix == d or prefix.startswith(d + os.sep) for d in SYSTEM_DIRS):
        args += ["--ro-bind", prefix, prefix]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
             "--bind", workdir, WORKDIR, "--chdir", WORKDIR, "--clearenv"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    return args + ["--", python, *argv[1:]]


@functools.cache
def available() -> Optional[str]:
    """None when a sandboxed call works here, else why not (probed once per process)."""
    import tempfile

    if shutil.which("bwrap") is None:
        return f"bwrap is not installed: {INSTALL_HINT}"
    try:
        interpreter()
    except RuntimeError as e:
        return str(e)
    workdir = tempfile.mkdtemp(prefix="appo_sandbox_probe_")
    try:
        with call_identity() as uid:
            if uid is not None:
                os.chown(workdir, uid, uid)
            argv = command(workdir, ["python", "-I", "-S", "-c", "print('ok')"],
                           {"PATH": "/usr/bin"})
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                  **as_user(uid))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        return f"bwrap cannot run here ({type(e).__name__}: {e}): {INSTALL_HINT}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if done.returncode != 0 or done.stdout.strip() != "ok":
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"bwrap cannot create its namespaces here ({why}): {INSTALL_HINT}"
    return None


def as_user(uid: Optional[int]) -> dict:
    """Popen keyword arguments that run the child as `uid` (its own gid, no extra groups)."""
    return {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
