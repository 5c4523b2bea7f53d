"""Tools the rollout loop can call, registered by name (docs/algorithm.md, issue 5 item 4).

A tool is `fn(arguments: str) -> str`: it gets the text of the call's one argument (between
`<name>` and `</name>` in the tag format; the value of its one parameter in a chat model's JSON
call) and returns the text that the loop appends as the tool's result. Tools never raise into the
rollout: the registry wraps every tool so that an exception comes back as result text
("error: ..."), and the built-in tools turn their own failures into clear messages. A tool also
has a description and a parameter name, which a chat model sees as its function schema
(`tool_schema`).

    register_tool("echo", lambda arguments: arguments)  # or as a decorator
    get_tool("calculator")("3 + 4 * (5 - 2)")          # '15'

Built-in tools:
- `calculator`: arithmetic over Python's `ast`, never `eval` (see `calculator`).
- `python`: code run in a limited subprocess (see `PythonTool`).
"""

from __future__ import annotations

import ast
import hashlib
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache
from typing import Callable, Optional, Union

from appo.registry import Registry

ToolFn = Callable[[str], str]

_TOOLS = Registry("tool", "callable as fn(arguments: str) -> str")
# tags of the tool protocols themselves (appo.rollout.protocol): a tool of that name would be
# ambiguous
_RESERVED_NAMES = frozenset({"result", "answer", "tool_call"})
_TOOL_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class ToolSpec:
    """What a chat model is told about a tool: its description and its one string parameter."""

    description: str
    parameter: str = "input"


_SPECS: dict[str, ToolSpec] = {}


def register_tool(name: str, fn: Optional[ToolFn] = None, *, replace: bool = False,
                  description: Optional[str] = None, parameter: str = "input",
                  inline: bool = False):
    """Register `fn` as the tool `name`; without `fn`, return a decorator that does.

    `name` becomes the tag the model writes (`<name>arguments</name>`), so it must be an identifier
    and not one of the protocols' own tags (`result`, `answer`, `tool_call`). `description` and
    `parameter` (the name of the one string argument) form the tool's schema for chat models;
    the description defaults to the first line of `fn`'s docstring. Registering a taken name
    raises unless `replace=True` (e.g. to swap in a `PythonTool` with other limits). Returns `fn`
    unchanged; the registry holds a wrapper that turns exceptions and non-string results into
    result text.

    `inline=True` declares the tool fast and ending by itself (a pure function with its own size
    limits, like the calculator): the rollout calls it on its own thread, one call after another,
    instead of in a watchdog thread per call with `tool_timeout` (a thread per calculator call
    cost ~12% of a step of the embedded default under load). Tools that may take long or hang (a
    subprocess, a network call) stay False: their calls run in parallel threads.
    """
    if not isinstance(name, str) or not _TOOL_NAME_RE.match(name):
        raise ValueError(f"tool name must be an identifier (letters, digits, _), got {name!r}")
    if name in _RESERVED_NAMES:
        raise ValueError(f"tool name {name!r} is reserved by the tool-call protocols")
    if not isinstance(parameter, str) or not _TOOL_NAME_RE.match(parameter):
        raise ValueError(f"parameter must be an identifier, got {parameter!r}")

    def add(tool: ToolFn) -> ToolFn:
        _TOOLS.add(name, tool, replace=replace,
                   transform=lambda t: _never_raises(t, inline=inline))
        doc = (getattr(tool, "__doc__", None) or "").strip().splitlines()
        _SPECS[name] = ToolSpec(description or (doc[0] if doc else f"the {name} tool"), parameter)
        return tool

    return add if fn is None else add(fn)


def get_tool(name: str) -> ToolFn:
    """The registered tool `name`, wrapped so that calling it never raises (errors become text)."""
    return _TOOLS.get(name)


def tool_names() -> tuple[str, ...]:
    """Names of the registered tools, in registration order."""
    return _TOOLS.names()


def tool_spec(name: str) -> ToolSpec:
    _TOOLS.get(name)  # raises ValueError for an unknown tool
    return _SPECS[name]


def tool_schema(name: str) -> dict:
    """The tool as a JSON-schema function, the form `apply_chat_template(tools=...)` takes."""
    spec = tool_spec(name)
    return {"type": "function", "function": {
        "name": name, "description": spec.description,
        "parameters": {"type": "object",
                       "properties": {spec.parameter: {"type": "string"}},
                       "required": [spec.parameter]}}}


def runs_inline(tool: ToolFn) -> bool:
    """Whether `tool` was registered with `inline=True` (or wraps one that was)."""
    return bool(getattr(tool, "inline", False))


def _never_raises(tool: ToolFn, *, inline: bool = False) -> ToolFn:
    def guarded(arguments: str) -> str:
        try:
            result = tool(arguments)
        except Exception as e:  # a tool error is a result for the model, not a crash of the rollout
            return f"error: {type(e).__name__}: {e}"
        return "" if result is None else str(result)

    guarded.__wrapped__ = tool
    guarded.__name__ = getattr(tool, "__name__", "tool")
    guarded.inline = inline
    return guarded


# --------------------------------------------------------------------------------------------------
# calculator

CALC_MAX_CHARS = 256  # expression length
CALC_MAX_DEPTH = 32  # nesting of operators and parentheses in the syntax tree
CALC_MAX_EXPONENT = 1000  # |b| in a ** b
CALC_MAX_MAGNITUDE = 10**15  # bound on every |value|; floats hold integers exactly up to 2**53
_TOO_LARGE = f"result too large (|value| > {float(CALC_MAX_MAGNITUDE):.0e})".replace("e+", "e")
CALC_SIGNIFICANT_DIGITS = 12  # non-integers are rounded to this many (float noise sits at the 17th)

_NUMBER_RE = re.compile(r"(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\Z")  # plain decimal literals only
# anything the tokenizer could read as a number literal: checked against _NUMBER_RE before parsing,
# because ast.parse warns (SyntaxWarning) about literals glued to letters, such as "1if"
_NUMBER_TOKEN_RE = re.compile(r"(?<!\w)\.?\d(?:[eE][+-]|[\w.])*")
_UNICODE_OPERATORS = str.maketrans({"\u00d7": "*", "\u00f7": "/", "\u2212": "-"})  # × ÷ −

_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: _divide(a, b),
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: _power(a, b),
}
_UNARY = {ast.UAdd: lambda a: +a, ast.USub: lambda a: -a}
_FORBIDDEN = {  # the syntax a model is most likely to try, with the message it gets
    ast.Name: "names are not allowed",
    ast.Call: "function calls are not allowed",
    ast.Attribute: "attribute access is not allowed",
    ast.Subscript: "indexing is not allowed",
    ast.BitXor: "'^' is not supported, use ** for powers",
}


class CalculatorError(ValueError):
    pass


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression; the result, or "error: ..." (never raises).

    Grammar: int and decimal-float literals (`12`, `2.5`, `.5`, `1e-3`), `+ - * / // % **`,
    unary `+`/`-`, parentheses, with Python's precedence and associativity (`**` binds tighter than
    unary minus and is right-associative: `-2**2` is -4, `2**3**2` is 512). `×`, `÷`, `−` are
    read as `*`, `/`, `-`. The text is parsed with `ast` and only those nodes are evaluated: names,
    calls, attributes, comparisons and every other construct are rejected, so nothing but
    arithmetic ever runs.

    `/` between integers that divide exactly gives an integer (`6/3` is 2); otherwise it is float
    division. Limits: `CALC_MAX_CHARS` characters, `CALC_MAX_DEPTH` nesting levels, exponents up
    to `CALC_MAX_EXPONENT` in magnitude, every intermediate value within `CALC_MAX_MAGNITUDE`.

    Formatting (`format_number`): floats are rounded to `CALC_SIGNIFICANT_DIGITS` significant
    digits (to units from 10**CALC_SIGNIFICANT_DIGITS up, so the integer part stays exact), which
    removes float noise (0.1 + 0.2 gives "0.3"); a value that is then integral prints as an integer
    ("15", never "15.0"); others print in Python's shortest repr ("0.333333333333", "1e-05").
    """
    try:
        return format_number(evaluate_arithmetic(expression))
    except CalculatorError as e:
        return f"error: {e}"


def evaluate_arithmetic(expression: str) -> Union[int, float]:
    """The value of `expression` under the calculator's grammar; raises CalculatorError."""
    text = expression.translate(_UNICODE_OPERATORS).strip()
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > CALC_MAX_CHARS:
        raise CalculatorError(f"expression too long ({len(text)} > {CALC_MAX_CHARS} characters)")
    if any(quote in text for quote in "'\"\\"):  # also spares ast.parse's escape warnings
        raise CalculatorError("strings are not allowed")
    for token in _NUMBER_TOKEN_RE.findall(text):
        if not _NUMBER_RE.match(token):
            raise CalculatorError(f"not a decimal number: {token}")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError(f"invalid syntax: {text}") from None
    return _evaluate(tree.body, text, 1)


def format_number(value: Union[int, float]) -> str:
    """The canonical text of a calculator value (see `calculator`)."""
    if isinstance(value, int):
        return str(value)
    if abs(value) < 10**CALC_SIGNIFICANT_DIGITS:
        rounded = float(f"{value:.{CALC_SIGNIFICANT_DIGITS}g}")
    else:
        rounded = float(round(value))
    if rounded.is_integer():
        return str(int(rounded))  # also turns -0.0 into "0"
    return repr(rounded)


def _evaluate(node: ast.AST, text: str, depth: int) -> Union[int, float]:
    if depth > CALC_MAX_DEPTH:
        raise CalculatorError(f"expression nested too deeply (more than {CALC_MAX_DEPTH} levels)")
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):  # True, None, ...
            raise CalculatorError(f"not a decimal number: {ast.get_source_segment(text, node)}")
        value = node.value
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        # a flat chain a + b - c + ... parses left-deep: walk its left spine at this level, so
        # only real nesting (parentheses, right operands) counts towards the depth
        spine = []
        while isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            spine.append(node)
            node = node.left
        value = _evaluate(node, text, depth + 1)
        for link in reversed(spine):
            right = _evaluate(link.right, text, depth + 1)
            try:
                value = _bounded(_BINARY[type(link.op)](value, right))
            except ZeroDivisionError:
                raise CalculatorError("division by zero") from None
            except OverflowError:
                raise CalculatorError(_TOO_LARGE) from None
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate(node.operand, text, depth + 1))
    else:
        kind = type(node.op) if isinstance(node, (ast.BinOp, ast.UnaryOp)) else type(node)
        detail = _FORBIDDEN.get(kind, f"unsupported syntax ({kind.__name__})")
        segment = ast.get_source_segment(text, node)
        raise CalculatorError(f"{detail}: {segment}" if segment and kind is ast.Name else detail)
    return _bounded(value)


def _bounded(value) -> Union[int, float]:
    if isinstance(value, complex):
        raise CalculatorError("result is not a real number")
    if not math.isfinite(value) or abs(value) > CALC_MAX_MAGNITUDE:
        raise CalculatorError(_TOO_LARGE)
    return value


def _divide(a, b):
    if isinstance(a, int) and isinstance(b, int) and b != 0 and a % b == 0:
        return a // b  # exact: keep integers integral
    return a / b


def _power(base, exponent):
    if abs(exponent) > CALC_MAX_EXPONENT:
        raise CalculatorError(f"exponent too large (|exponent| > {CALC_MAX_EXPONENT})")
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero (zero to a negative power)")
    # decide from logarithms before computing, so 10**1000 is never built
    if base != 0 and exponent * math.log10(abs(base)) > math.log10(CALC_MAX_MAGNITUDE) + 1:
        raise CalculatorError(_TOO_LARGE)
    return base**exponent


# --------------------------------------------------------------------------------------------------
# python

PYTHON_MAX_OUTPUT_BYTES = 2048  # of stdout+stderr kept; more keeps the first and last halves
_CODE_FILE = "main.py"  # relative, so tracebacks read 'File "main.py"' whatever the temp dir
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000  # <sched.h>; os.unshare is 3.12+ only

# Runs in the fresh interpreter, before the user's code: limits and namespaces are set up here,
# inside the child, rather than in a Popen preexec_fn, which is unsafe in a threaded parent
# (torch and tokenizers start threads). Each setting is best effort: what the kernel refuses is
# skipped. argv: cpu_s mem_bytes file_bytes max_open_files isolate_network max_tasks
_CHILD_SETUP = r"""
def _main():
    import resource, sys, traceback

    def limit(kind, soft, hard):
        try:
            resource.setrlimit(kind, (soft, hard))
        except (ValueError, OSError):
            pass

    cpu_s, mem, fsize, nofile, isolate, tasks = (int(a) for a in sys.argv[1:7])
    limit(resource.RLIMIT_CPU, cpu_s, cpu_s + 1)  # SIGXCPU at the soft limit, SIGKILL at the hard
    limit(resource.RLIMIT_AS, mem, mem)
    limit(resource.RLIMIT_FSIZE, fsize, fsize)
    limit(resource.RLIMIT_NOFILE, nofile, nofile)
    limit(resource.RLIMIT_CORE, 0, 0)
    if tasks:
        limit(resource.RLIMIT_NPROC, tasks, tasks)
    if isolate:
        import ctypes
        unshare = ctypes.CDLL(None, use_errno=True).unshare
        # root: a new network namespace (only a loopback, down); a normal user: the same inside a
        # new user namespace, which most kernels allow without privileges
        unshare(%(NEWNET)d) == 0 or unshare(%(NEWUSER)d | %(NEWNET)d)
    del sys.argv[1:]
    sys.argv[0] = %(FILE)r
    with open(%(FILE)r, encoding="utf-8") as f:
        source = f.read()
    try:
        code = compile(source, %(FILE)r, "exec")
    except (SyntaxError, ValueError) as e:
        traceback.print_exception(e, limit=0)
        sys.exit(1)
    # run in the real __main__ (so pickle and multiprocessing find the user's functions), clean
    main = sys.modules["__main__"].__dict__
    del main["_main"]
    main["__file__"] = %(FILE)r
    try:
        exec(code, main)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        e.__traceback__ = e.__traceback__.tb_next  # hide this frame: the trace starts in main.py
        traceback.print_exception(e)
        sys.exit(1)

_main()
""" % {"NEWNET": _CLONE_NEWNET, "NEWUSER": _CLONE_NEWUSER, "FILE": _CODE_FILE}


SANDBOXES = ("bwrap", "rlimits")


@dataclass(frozen=True)
class PythonTool:
    """Run Python code in a sandbox with limits; the result is its output (never raises).

    `sandbox="bwrap"` (the default): the code runs under bubblewrap (`appo.rollout.sandbox`,
    docs/sandbox.md): fresh user/pid/network/ipc/uts/mount namespaces, an unprivileged uid,
    read-only system directories, a private work dir, no view of the trainer's files, home,
    environment or processes, no network. Where bwrap is missing or cannot create its
    namespaces the tool refuses to run (each call answers an error naming the setting).
    `sandbox="rlimits"` runs it without bwrap, limits only (and a network namespace where the
    kernel allows): NOT a sandbox (the code can read and write what the trainer can, see and
    signal its processes), for machines without bwrap and code that is trusted.

    Either way the code runs as `python -I -u` (isolated mode) in a fresh temporary directory
    (its cwd and HOME, deleted afterwards), stdin closed, a minimal environment, a new session,
    with these limits:
    - `timeout_s`: wall time; the whole call is then killed (SIGKILL).
    - `cpu_s`: CPU seconds of each process (RLIMIT_CPU).
    - `memory_bytes`: address space of each process (RLIMIT_AS): big allocations fail with
      MemoryError.
    - `max_processes`: processes and threads of the call, the first one included (RLIMIT_NPROC;
      under bwrap counted in the call's own user namespace). With bwrap, all processes of a call
      together hold at most `max_processes` × `memory_bytes` of address space.
    - `max_file_bytes`, `max_open_files`: RLIMIT_FSIZE and RLIMIT_NOFILE.
    - `isolate_network` (rlimits only): a new network namespace where the kernel allows one
      (`network_isolated()` tells).

    Output: stdout and stderr, interleaved as written (unbuffered), decoded as UTF-8. Beyond
    `max_output_bytes` the first and last halves are kept around a "[truncated N bytes]" line.
    Then a last line when the code did not end normally: "[exit code N]", "[killed by signal
    SIGABRT]", "[CPU time limit of N s exceeded]" or "[timed out after N s]"; "[no output]" when
    there is nothing else to say. An uncaught exception prints its traceback
    ('File "main.py", line 3').
    """

    timeout_s: float = 5.0
    cpu_s: int = 5
    memory_bytes: int = 512 << 20
    max_processes: int = 4
    max_file_bytes: int = 16 << 20
    max_open_files: int = 64
    max_output_bytes: int = PYTHON_MAX_OUTPUT_BYTES
    isolate_network: bool = True
    sandbox: str = "bwrap"

    def __post_init__(self):
        if self.sandbox not in SANDBOXES:
            raise ValueError(f"tools.python.sandbox must be one of {SANDBOXES}, got "
                             f"{self.sandbox!r}")
        for name in ("timeout_s", "cpu_s", "memory_bytes", "max_processes", "max_file_bytes",
                     "max_open_files", "max_output_bytes"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"tools.python.{name} must be a positive number, got {value!r}")

    def __call__(self, code: str) -> str:
        try:
            return self._run(_strip_code_fence(code))
        except Exception as e:  # the tool itself failed (no fork, no temp dir): still only text
            return f"error: python tool failed: {type(e).__name__}: {e}"

    def unavailable(self) -> Optional[str]:
        """Why this tool cannot run here (bwrap missing or refused), or None."""
        if self.sandbox != "bwrap":
            return None
        from . import sandbox

        return sandbox.available()

    def network_isolated(self) -> bool:
        """Whether code run by this tool really has no network here (probed once per setting)."""
        if self.sandbox == "bwrap":
            return self.unavailable() is None and _probe_network_isolation(self)
        return self.isolate_network and _probe_network_isolation(self)

    def _run(self, code: str) -> str:
        why = self.unavailable()
        if why is not None:
            return f"error: the python tool's sandbox cannot run here: {why}"
        from . import sandbox

        workdir = tempfile.mkdtemp(prefix="appo_python_")
        bwrap = self.sandbox == "bwrap"
        try:
            with open(os.path.join(workdir, _CODE_FILE), "w", encoding="utf-8") as f:
                f.write(code)
            limits = (max(1, math.ceil(self.cpu_s)), self.memory_bytes, self.max_file_bytes,
                      self.max_open_files, int(self.isolate_network and not bwrap),
                      # bwrap's own init is one task of the call's namespace
                      self.max_processes + 1 if bwrap else 0)
            argv = [sys.executable, "-I", "-u", "-c", _CHILD_SETUP, *map(str, limits)]
            with (sandbox.call_identity() if bwrap else nullcontext()) as uid:
                if bwrap:
                    if uid is not None:
                        os.chown(workdir, uid, uid)
                        os.chown(os.path.join(workdir, _CODE_FILE), uid, uid)
                    env = _child_env(sandbox.WORKDIR, "/tmp")
                    argv = sandbox.command(workdir, argv, env)
                    # bwrap itself gets the clean environment too: its init process (pid 1 in
                    # the sandbox, readable there) must not hold the trainer's
                    cwd, user = None, sandbox.as_user(uid)
                else:
                    env, cwd, user = _child_env(workdir, workdir), workdir, {}
                proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True, **user)
                with proc:
                    output, timed_out = self._collect(proc)
                    returncode = proc.wait()
            if bwrap and 128 < returncode < 128 + signal.NSIG:
                returncode = 128 - returncode  # bwrap exits 128 + n when its child died by signal n
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return self._describe(output, returncode, timed_out)

    def _collect(self, proc: subprocess.Popen) -> tuple[str, bool]:
        """Read the output until the process exits or the wall time is up, then kill its group."""
        buffer = _HeadTail(self.max_output_bytes)
        deadline = time.monotonic() + self.timeout_s
        fd = proc.stdout.fileno()
        timed_out = end_of_output = False
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                # wake up now and then: a child that exits while a grandchild holds the pipe open
                if not end_of_output and selector.select(timeout=min(left, 0.1)):
                    chunk = os.read(fd, 1 << 16)
                    if chunk:
                        buffer.add(chunk)
                        continue
                    end_of_output = True  # the process may still run: wait for its exit
                if _has_exited(proc.pid):
                    break
                if end_of_output:
                    time.sleep(0.002)
        # the leader is not reaped yet, so its group id cannot have been reused
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        os.set_blocking(fd, False)
        try:
            while chunk := os.read(fd, 1 << 16):
                buffer.add(chunk)
        except BlockingIOError:  # a writer that left the group still holds the pipe
            pass
        return buffer.text(), timed_out

    def _describe(self, output: str, returncode: int, timed_out: bool) -> str:
        notes = []
        if timed_out:
            notes.append(f"[timed out after {self.timeout_s:g} s]")
        elif returncode == -signal.SIGXCPU:
            notes.append(f"[CPU time limit of {max(1, math.ceil(self.cpu_s))} s exceeded]")
        elif returncode < 0:
            notes.append(f"[killed by signal {_signal_name(-returncode)}]")
        elif returncode > 0:
            notes.append(f"[exit code {returncode}]")
        text = output.rstrip("\n")
        if notes:
            text = "\n".join(([text] if text else []) + notes)
        return text or "[no output]"


def configure_python(tools: dict, sandbox: str = "bwrap", **limits) -> dict:
    """`tools` with appo's python tool (if there) replaced by one with these settings; raises
    ValueError, naming `tools.python.sandbox`, when the sandbox cannot run here."""
    tool = tools.get("python")
    if not isinstance(getattr(tool, "__wrapped__", tool), PythonTool):
        return tools  # not there, or the user's own
    configured = PythonTool(sandbox=sandbox, **limits)
    why = configured.unavailable()
    if why is not None:
        raise ValueError(f"tools.python.sandbox={sandbox}: the python tool's sandbox cannot "
                         f"run here: {why}")
    return {**tools, "python": configured}


def _strip_code_fence(code: str) -> str:
    """Models often wrap code in a Markdown fence or indent it; run what is inside."""
    body = code.strip("\n")
    lines = body.strip().splitlines()
    if len(lines) >= 2 and lines[0].startswith("```") and lines[-1].strip() == "```":
        body = "\n".join(lines[1:-1])
    return textwrap.dedent(body) + "\n"


def _child_env(home: str, tmp: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": tmp,
        "LC_ALL": "C.UTF-8",
        "LANG": "C.UTF-8",
        # numeric libraries would start one thread per core (and reserve memory for each)
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _has_exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (WNOWAIT)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


class _HeadTail:
    """Keeps the first and the last `limit` bytes of a stream, and its length."""

    def __init__(self, limit: int):
        self.limit, self.total = limit, 0
        self.head, self.tail = bytearray(), bytearray()

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.head += chunk[:max(0, self.limit - len(self.head))]
        self.tail += chunk
        del self.tail[:max(0, len(self.tail) - self.limit)]

    def text(self) -> str:
        if self.total <= self.limit:
            return self.head.decode("utf-8", "replace")
        keep = self.limit // 2
        head = self.head[:keep].decode("utf-8", "replace")
        tail = self.tail[len(self.tail) - keep:].decode("utf-8", "replace")
        return f"{head}\n[truncated {self.total - 2 * keep} bytes]\n{tail}"


@cache
def _probe_network_isolation(tool: PythonTool) -> bool:
    probe = "import socket\nprint(all(name == 'lo' for _, name in socket.if_nameindex()))"
    return tool(probe) == "True"


@dataclass(frozen=True)
class FlakyTool:
    """`tool`, failing on a share of the texts it is called with: `failure_share` of all possible
    argument texts answer `message` instead of the result. Which ones is a hash of (seed, text),
    so a run is reproducible and the same call always fails; the same call written differently
    (another spacing, parentheses) is another draw. For tasks where what the model does after a
    tool result matters (retry or give up)."""

    tool: ToolFn
    failure_share: float
    seed: int = 0
    message: str = "error: busy"

    def __post_init__(self):
        if not 0.0 <= self.failure_share < 1.0:
            raise ValueError(f"failure_share must be in [0, 1), got {self.failure_share}")

    @property
    def inline(self) -> bool:
        return runs_inline(self.tool)

    def fails(self, arguments: str) -> bool:
        digest = hashlib.blake2b(f"{self.seed}:{arguments}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") < self.failure_share * 2**64

    def __call__(self, arguments: str) -> str:
        return self.message if self.fails(arguments) else self.tool(arguments)


register_tool("calculator", calculator, parameter="expression", inline=True,
              description="Evaluate an arithmetic expression (numbers, + - * / // % **, "
                          "parentheses) and return its value.")
register_tool("python", PythonTool(), parameter="code",
              description="Run a Python program and return what it prints (stdout and stderr).")
