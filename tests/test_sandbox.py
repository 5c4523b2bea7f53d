"""The python tool's sandbox (appo/rollout/sandbox.py, docs/sandbox.md) against the attacks a
policy's code would try, written as a model would write them: each is bounded (timeouts, small
counts, loopback only), each fails inside the sandbox, and ordinary code still works.

These need bubblewrap that can create namespaces here; where it cannot they skip with the
reason, unless APPO_REQUIRE_SANDBOX=1 (set by `make test`, which installs bwrap where apt is
available): then they fail.
"""

import os
import socket
import threading
import time

import pytest

from appo.rollout import sandbox
from appo.rollout.tools import PythonTool

REASON = sandbox.available()
if REASON is not None:
    if os.environ.get("APPO_REQUIRE_SANDBOX") == "1":
        raise RuntimeError(f"APPO_REQUIRE_SANDBOX=1 but the sandbox cannot run: {REASON}")
    pytest.skip(f"the sandbox cannot run here: {REASON}", allow_module_level=True)

TOOL = PythonTool(timeout_s=5, cpu_s=5, memory_bytes=256 << 20, max_processes=4)
PID = os.getpid()


def test_ordinary_code_still_works():
    code = ("import json, math, itertools, subprocess, sys\n"
            "open('data.json', 'w').write(json.dumps({'x': math.factorial(10)}))\n"
            "print(json.load(open('data.json'))['x'])\n"
            "print(sum(itertools.islice(itertools.count(), 5)))\n"
            "print(subprocess.run([sys.executable, '-c', 'print(2 + 2)'],\n"
            "                     capture_output=True, text=True).stdout.strip())")
    assert TOOL(code) == "3628800\n10\n4"


def test_no_way_back_to_the_host_network():
    """A listener on the host's loopback; the code tries to reach it directly and by joining the
    trainer's network namespace through /proc (setns)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    reached = []

    def accept():
        try:
            reached.append(server.accept())
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    result = TOOL(f"""
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
for pid in ['{PID}', '1', str(os.getppid())] + os.listdir('/proc'):
    try:
        fd = os.open(f'/proc/{{pid}}/ns/net', os.O_RDONLY)
        libc.setns(fd, 0x40000000)
    except OSError:
        pass
try:
    socket.create_connection(('127.0.0.1', {port}), timeout=1)
    print('REACHED')
except OSError as e:
    print('refused:', e)
""")
    thread.join(4)
    server.close()
    assert not reached and "REACHED" not in result, result


def test_the_trainers_environment_and_processes_are_invisible(monkeypatch):
    monkeypatch.setenv("APPO_TEST_TOKEN", "hf_secret_token")
    result = TOOL(f"""
import os
for path in ['/proc/{PID}/environ', '/proc/1/environ', '/proc/self/environ']:
    try:
        print(path, open(path, 'rb').read())
    except OSError as e:
        print(path, 'error', e.errno)
print('pids', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
""")
    assert "hf_secret_token" not in result
    pids = eval(result.splitlines()[-1].removeprefix("pids "))
    assert PID not in pids and max(pids) < 10  # its own pid namespace: a handful of processes


def test_the_trainers_files_are_out_of_reach(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("api key")
    target = tmp_path / "planted.py"
    home = os.path.expanduser("~")
    result = TOOL(f"""
import os
for path in [{str(secret)!r}, {home!r} + '/.bashrc', '/etc/passwd', '/proc/{PID}/cwd']:
    try:
        print(path, open(path).read()[:40])
    except OSError as e:
        print(path, 'error', e.errno)
for path in [{str(target)!r}, '/usr/lib/planted.py', '/tmp/planted.py']:
    try:
        open(path, 'w').write('import os; os.system("rm -rf /")')
        print('wrote', path)
    except OSError as e:
        print(path, 'error', e.errno)
""")
    assert "api key" not in result and not target.exists()
    assert not os.path.exists("/usr/lib/planted.py") and not os.path.exists("/tmp/planted.py")
    assert "wrote /tmp/planted.py" in result  # its own /tmp: empty, private, gone after


def test_the_trainer_cannot_be_signalled():
    result = TOOL(f"""
import os, signal
for pid in [{PID}, 1, -1]:
    try:
        os.kill(pid, signal.SIGTERM if pid > 1 else 0)
        print('sent', pid)
    except OSError as e:
        print('denied', pid, e.errno)
""")
    assert f"sent {PID}" not in result
    time.sleep(0.2)
    assert os.getpid() == PID  # still here (a SIGTERM would have run pytest's handler)


def test_a_detached_double_fork_does_not_outlive_the_call():
    marker = f"{time.time_ns() % 10**9}.75"
    TOOL(f"""
import os, subprocess
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execvp('sleep', ['sleep', '{marker}'])
    os._exit(0)
print('detached')
""")
    time.sleep(0.3)
    assert not any(_cmdline(p) == ["sleep", marker] for p in os.listdir("/proc") if p.isdigit())


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode() for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def test_memory_is_bounded_for_all_processes_together():
    """Forked children each holding 400 MiB: the call cannot hold more than max_processes ×
    memory_bytes (4 × 256 MiB) in all; one process cannot hold 400 MiB at all."""
    result = TOOL("""
import os, time
held = 0
for i in range(6):
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        try:
            block = bytearray(400 << 20)
            os.write(w, b'1')
        except MemoryError:
            os.write(w, b'0')
        time.sleep(2)
        os._exit(0)
    held += os.read(r, 1) == b'1'
print('held', held)
""")
    assert result.startswith("held 0"), result


def test_a_fork_bomb_is_bounded_and_the_call_returns():
    start = time.monotonic()
    result = TOOL("""
import os, time
n = 0
for i in range(2000):
    try:
        if os.fork() == 0:
            time.sleep(3)
            os._exit(0)
        n += 1
    except OSError:
        break
print('forked', n)
""")
    assert time.monotonic() - start < 8
    forked = int(result.split()[1])
    assert forked <= TOOL.max_processes - 1, result


def test_the_sandbox_runs_as_an_unprivileged_uid():
    """Seen from outside: the sandboxed processes belong to an unprivileged uid (one of the
    pool's when the trainer is root), mapped to itself, not to root."""
    marker = f"1.{time.time_ns() % 10**9}"  # seconds: unique, and short
    result = []
    call = threading.Thread(target=lambda: result.append(TOOL(
        f"import os, subprocess\nprint(os.getuid())\nsubprocess.run(['sleep', '{marker}'])")))
    call.start()
    seen = None
    for _ in range(200):
        seen = next((p for p in os.listdir("/proc") if p.isdigit()
                     and _cmdline(p) == ["sleep", marker]), None)
        if seen:
            break
        time.sleep(0.02)
    assert seen, "the sandboxed process was not found"
    outside_uid = os.stat(f"/proc/{seen}").st_uid
    with open(f"/proc/{seen}/uid_map") as f:
        mapping = f.read().split()
    call.join()
    assert outside_uid != 0 and mapping[1] != "0"
    if os.geteuid() == 0:
        assert sandbox.UID_BASE <= outside_uid < sandbox.UID_BASE + sandbox.MAX_SLOTS
    assert int(result[0].splitlines()[0]) == outside_uid


def test_without_bwrap_the_tool_refuses_with_the_setting_to_change(monkeypatch):
    monkeypatch.setattr(sandbox, "available", lambda: "bwrap is not installed: install it")
    result = PythonTool()("print(1)")
    assert result.startswith("error: the python tool's sandbox cannot run here: bwrap is not")
    assert PythonTool(sandbox="rlimits")("print(1)") == "1"
