"""Rollout tools: the registry, the calculator (against Python and an independent evaluator) and
the sandboxed python tool (limits, crashes and timeouts come back as text)."""

import glob
import math
import os
import random
import string
import tempfile
import time

import pytest

from appo.rollout import sandbox, tools
from appo.rollout.tools import PythonTool, calculator, get_tool, register_tool, tool_names

# ----------------------------------------------------------------------------------------------
# registry


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so that tests can register tools freely."""
    monkeypatch.setattr(tools._TOOLS, "entries", dict(tools._TOOLS.entries))


def test_builtin_tools_are_registered():
    assert {"calculator", "python"} <= set(tool_names())
    assert get_tool("calculator")("1 + 2") == "3"


def test_unknown_tool_raises_with_the_registered_names():
    with pytest.raises(ValueError, match="unknown tool 'nope'.*calculator"):
        get_tool("nope")


def test_custom_tool_by_decorator_and_by_call(registry):
    @register_tool("shout")
    def shout(arguments: str) -> str:
        return arguments.upper()

    register_tool("count", lambda arguments: len(arguments))
    assert shout("x") == "X"  # the decorator returns the function unchanged
    assert get_tool("shout")("hi") == "HI"
    assert get_tool("count")("abc") == "3"  # non-string results become text
    assert tool_names()[-2:] == ("shout", "count")


def test_registering_a_taken_name_needs_replace(registry):
    with pytest.raises(ValueError, match="already registered"):
        register_tool("calculator", lambda a: a)
    register_tool("calculator", lambda a: "replaced", replace=True)
    assert get_tool("calculator")("1+1") == "replaced"


@pytest.mark.parametrize("name", ["answer", "result", "two words", "<x>", "9lives", ""])
def test_tool_names_must_be_usable_tags(registry, name):
    with pytest.raises(ValueError):
        register_tool(name, lambda a: a)


def test_a_raising_tool_returns_error_text(registry):
    def broken(arguments):
        raise RuntimeError("boom")

    register_tool("broken", broken)
    assert get_tool("broken")("x") == "error: RuntimeError: boom"


def test_inline_tools_run_on_the_rollouts_thread_others_in_watched_threads(registry):
    """The calculator (inline) runs without a thread; a tool that may hang runs in its own thread
    and is abandoned at the timeout, with the other calls' results intact."""
    import threading
    import time

    from appo.rollout.toolloop import run_tools
    from appo.rollout.tools import runs_inline

    seen = {}

    def where(name):
        def tool(arguments):
            seen[name] = threading.get_ident()
            if arguments == "hang":
                time.sleep(5)
            return name
        return tool

    register_tool("fast", where("fast"), inline=True)
    register_tool("slow", where("slow"))
    assert runs_inline(get_tool("fast")) and runs_inline(get_tool("calculator"))
    assert not runs_inline(get_tool("slow")) and not runs_inline(get_tool("python"))
    started = time.monotonic()
    results = run_tools([(get_tool("slow"), "hang"), (get_tool("fast"), "x"),
                         (get_tool("calculator"), "2 + 3")], timeout=0.3)
    assert time.monotonic() - started < 3
    assert results == ["error: tool timed out after 0.3 s", "fast", "5"]
    assert seen["fast"] == threading.get_ident() != seen["slow"]


# ----------------------------------------------------------------------------------------------
# calculator: an independent evaluator over a test-side expression tree
#
# A tree is ("num", text, value) | ("neg", child) | (op, left, right). The renderer encodes
# Python's grammar: + - (1) < * / // % (2) < unary minus (3) < ** (4, right-associative, whose
# right operand may be a unary expression); so the calculator agrees only if it parses with the
# same precedence and associativity.

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "%": 2, "neg": 3, "**": 4, "num": 5}


def _random_tree(rng, depth, ops, decimals):
    if depth == 0 or rng.random() < 0.25:
        if decimals and rng.random() < 0.3:
            text = f"{rng.randint(0, 20)}.{rng.randint(0, 9)}"
            return ("num", text, float(text))
        value = rng.randint(0, 20)
        return ("num", str(value), value)
    if rng.random() < 0.1:
        return ("neg", _random_tree(rng, depth - 1, ops, decimals))
    op = rng.choice(ops)
    if op == "**":  # small integer exponents on an operand keep every value far below the limits
        exponent = rng.randint(0, 3)
        return ("**", _random_tree(rng, 0, ops, decimals), ("num", str(exponent), exponent))
    return (op, _random_tree(rng, depth - 1, ops, decimals),
            _random_tree(rng, depth - 1, ops, decimals))


def _render(tree, rng):
    kind = tree[0]
    if kind == "num":
        text = tree[1]
    elif kind == "neg":
        inner = _render(tree[1], rng)
        text = "-" + (f"({inner})" if _PRECEDENCE[tree[1][0]] < 3 else inner)
    else:
        left, right = _render(tree[1], rng), _render(tree[2], rng)
        p, pl, pr = _PRECEDENCE[kind], _PRECEDENCE[tree[1][0]], _PRECEDENCE[tree[2][0]]
        if kind == "**":
            needs_left, needs_right = pl <= p, pr < 3
        else:
            needs_left, needs_right = pl < p, pr <= p
        left = f"({left})" if needs_left else left
        right = f"({right})" if needs_right else right
        text = f"{left} {kind} {right}"
    return f"({text})" if rng.random() < 0.1 else text  # redundant parentheses now and then


class _TooLarge(Exception):
    pass


_BINARY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": lambda a, b: a / b, "//": lambda a, b: a // b, "%": lambda a, b: a % b,
           "**": lambda a, b: a**b}


def _evaluate(tree):
    """Python's semantics node by node, left operand first; _TooLarge past the calculator's
    bound."""
    kind = tree[0]
    if kind == "num":
        value = tree[2]
    elif kind == "neg":
        value = -_evaluate(tree[1])
    else:
        left, right = _evaluate(tree[1]), _evaluate(tree[2])
        value = _BINARY[kind](left, right)
    if abs(value) > tools.CALC_MAX_MAGNITUDE:
        raise _TooLarge
    return value


@pytest.mark.parametrize("ops, decimals", [(["+", "-", "*", "**"], False),
                                           (["+", "-", "*", "/", "//", "%", "**"], True)])
def test_calculator_matches_python_on_random_expressions(ops, decimals):
    """Integer rings exactly; with / // % and decimals, equal to Python's float result up to the
    12 printed digits. The expected value comes from the test's tree, and agrees with eval() of
    the rendered text (which checks the renderer's precedence table)."""
    rng = random.Random(os.urandom(8))
    for _ in range(400):
        tree = _random_tree(rng, rng.randint(1, 4), ops, decimals)
        text = _render(tree, rng)
        got = calculator(text)
        try:
            expected = _evaluate(tree)
        except ZeroDivisionError:
            assert got == "error: division by zero", (text, got)
            continue
        except _TooLarge:
            assert got.startswith("error: result too large"), (text, got)
            continue
        assert eval(text) == expected, text  # test-generated arithmetic only
        if decimals:
            assert math.isclose(float(got), expected, rel_tol=1e-11), (text, got, expected)
        else:
            assert got == str(expected), (text, got, expected)


@pytest.mark.parametrize("expression, expected", [
    ("3 + 4 * (5 - 2)", "15"),
    ("2 + 3 * 4", "14"),
    ("(2 + 3) * 4", "20"),
    ("10 - 4 - 3", "3"),  # left-associative
    ("100 / 10 / 5", "2"),
    ("2 ** 3 ** 2", "512"),  # right-associative
    ("-2 ** 2", "-4"),  # ** binds tighter than unary minus
    ("2 ** -1", "0.5"),
    ("-7 // 2", "-4"),
    ("-7 % 3", "2"),
    ("+3 - -3", "6"),
    ("  12  ", "12"),
    ("3 \u00d7 4 \u2212 2 \u00f7 2", "11"),  # × − ÷
])
def test_calculator_precedence(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize("expression, expected", [
    ("6 / 3", "2"),  # exact integer division stays an integer
    ("7 / 2", "3.5"),
    ("1 / 3", "0.333333333333"),  # 12 significant digits
    ("0.1 + 0.2", "0.3"),  # float noise rounded away
    ("2.5 * 2", "5"),  # integral floats print without ".0"
    ("-0.0", "0"),
    ("1e-7", "1e-07"),
    ("10 ** 15", "1000000000000000"),
    ("123456789012345.5 - 0.5", "123456789012345"),
])
def test_calculator_formatting(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize("expression, message", [
    ("abs(-3)", "function calls are not allowed"),
    ("__import__('os').system('ls')", "strings are not allowed"),
    ("exit(1)", "function calls are not allowed"),
    ("x + 1", "names are not allowed: x"),
    ("(1).real", "attribute access is not allowed"),
    ("[1][0]", "indexing is not allowed"),
    ("lambda: 1", "unsupported syntax"),
    ("1 < 2", "unsupported syntax"),
    ("'a' * 3", "strings are not allowed"),
    ("1 if 1 else 2", "unsupported syntax"),
    ("1if 1else 2", "not a decimal number: 1if"),
    ("True + 1", "not a decimal number"),
    ("0x10", "not a decimal number"),
    ("1_000", "not a decimal number"),
    ("2j", "not a decimal number"),
    ("1e5j", "not a decimal number"),
    ("1.5.2", "not a decimal number"),
    ("3 ^ 2", "use ** for powers"),
    ("10 ** 100", "result too large"),
    ("999999 * 999999 * 999999", "result too large"),
    ("1e999", "result too large"),
    ("9 ** 9 ** 9", "exponent too large"),
    ("2 ** 5000", "exponent too large"),
    ("1" + " + 1" * 100, "expression too long"),
    ("-" * 40 + "1", "nested too deeply"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("5 // 0.0", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("(-8) ** 0.5", "not a real number"),
    ("1 +", "invalid syntax"),
    ("1, 2", "unsupported syntax"),
    ("", "empty expression"),
])
def test_calculator_rejects_with_a_clear_error(expression, message):
    result = calculator(expression)
    assert result.startswith("error: ") and message in result, result


@pytest.mark.filterwarnings("error")  # nor lets the parser warn
def test_calculator_never_raises_on_junk():
    rng = random.Random(os.urandom(8))
    alphabet = string.printable + "\u00d7\u00f7\u2212"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert isinstance(calculator(text), str)


# ----------------------------------------------------------------------------------------------
# python tool

# the plumbing tests run in the sandbox where it works (always in CI), else with limits only
HERE = "bwrap" if sandbox.available() is None else "rlimits"
FAST = PythonTool(timeout_s=2, cpu_s=2, memory_bytes=512 << 20, sandbox=HERE)
needs_bwrap = pytest.mark.skipif(HERE != "bwrap", reason=f"no sandbox: {sandbox.available()}")


def test_python_prints():
    assert FAST("print('hello')\nprint(2 + 3)") == "hello\n5"
    assert FAST("x = 1") == "[no output]"


def test_python_strips_a_markdown_fence_and_indentation():
    assert FAST("```python\n    print(7)\n```") == "7"


def test_python_exception_comes_back_as_a_traceback():
    result = FAST("print('before')\n1 / 0")
    assert result.startswith("before\nTraceback (most recent call last):")
    assert 'File "main.py", line 2' in result
    assert "ZeroDivisionError: division by zero" in result
    assert result.endswith("[exit code 1]")


def test_python_syntax_error():
    result = FAST("def f(:\n    pass")
    assert "SyntaxError" in result and result.endswith("[exit code 1]")


def test_python_exit_code_and_abort():
    assert FAST("import sys\nprint('bye')\nsys.exit(3)") == "bye\n[exit code 3]"
    assert FAST("import os\nprint('x')\nos.abort()") == "x\n[killed by signal SIGABRT]"


def test_python_infinite_loop_times_out():
    start = time.monotonic()
    result = PythonTool(timeout_s=1, cpu_s=10, sandbox=HERE)("print('spinning')\nwhile True: pass")
    assert time.monotonic() - start < 3
    assert result == "spinning\n[timed out after 1 s]"


def test_python_sleep_times_out_on_wall_time():
    result = PythonTool(timeout_s=0.5, cpu_s=10, sandbox=HERE)("import time\ntime.sleep(60)")
    assert result == "[timed out after 0.5 s]"


def test_python_cpu_limit():
    result = PythonTool(timeout_s=10, cpu_s=1, sandbox=HERE)("while True: pass")
    assert result == "[CPU time limit of 1 s exceeded]"


def test_python_memory_hog_comes_back_as_text():
    result = FAST("x = bytearray(4 << 30)\nprint('allocated')")
    assert "MemoryError" in result and "allocated" not in result


def test_python_output_is_truncated_visibly():
    result = PythonTool(max_output_bytes=100, sandbox=HERE)("for i in range(1000):\n    print(i)")
    assert result.startswith("0\n1\n2\n")
    assert result.endswith("998\n999")
    assert "\n[truncated " in result and len(result) < 200


def test_python_stdin_is_closed():
    assert "EOFError" in FAST("input()")


def work_dirs():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "appo_python_*")))


@pytest.mark.parametrize("mode", [pytest.param("bwrap", marks=needs_bwrap), "rlimits"])
def test_python_runs_in_a_clean_temporary_directory(monkeypatch, mode):
    monkeypatch.setenv("APPO_TEST_SECRET", "hunter2")
    before = work_dirs()
    result = PythonTool(sandbox=mode, timeout_s=2)(
        "import os\nprint(os.environ.get('APPO_TEST_SECRET'))\nprint(os.getcwd())")
    secret, workdir = result.splitlines()
    assert secret == "None"
    assert work_dirs() == before  # removed after the run
    if mode == "bwrap":
        assert workdir == "/work"


@pytest.mark.parametrize("mode", [pytest.param("bwrap", marks=needs_bwrap), "rlimits"])
def test_python_kills_leftover_children(mode):
    marker = f"{time.time_ns() % 10**9}.25"  # a sleep only this test starts
    start = time.monotonic()
    PythonTool(sandbox=mode, timeout_s=2)(
        "import subprocess\n"
        f"subprocess.Popen(['sleep', '{marker}'])\n"
        "print('started')")
    assert time.monotonic() - start < 1.5  # does not wait for the child holding the pipe
    for _ in range(50):
        if not sleeping(marker):
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"the call's child (sleep {marker}) still runs")


def sleeping(marker):
    """Whether a `sleep MARKER` process runs on this machine (zombies do not count)."""
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:2] != [b"sleep", marker.encode()]:
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return True
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError, PermissionError):
            pass
    return False


def test_python_has_no_network():
    if not PythonTool().network_isolated():
        pytest.skip("no sandbox or network namespace here: network isolation is off")
    result = FAST("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)")
    assert "OSError" in result and "unreachable" in result
    assert not PythonTool(sandbox="rlimits", isolate_network=False).network_isolated()


def test_python_tool_failure_is_text(monkeypatch):
    def no_fork(*args, **kwargs):
        raise OSError("fork failed")

    monkeypatch.setattr(tools.subprocess, "Popen", no_fork)
    assert FAST("print(1)") == "error: python tool failed: OSError: fork failed"


@needs_bwrap
def test_registered_python_tool():
    assert get_tool("python")("print(6 * 7)") == "42"


def test_a_long_flat_sum_is_not_nesting():
    assert calculator("+".join(["1"] * 100)) == "100"
    assert calculator("-".join(["100"] + ["1"] * 60)) == "40"
    nested = "1" + "+(1" * 40 + ")" * 40  # 1+(1+(1+...)): real nesting
    assert calculator(nested).startswith("error: expression nested too deeply")
