"""Tasks: the registry, the calc task (splits, demonstrations, reward) and the jsonl task."""

import ast
import json
import random
import string

import pytest

from appo.rollout.format import extract_answer, format_tool_result, tool_call_at_end
from appo.rollout.tools import calculator
from appo.tasks import (CalcTask, JsonlTask, Problem, Task, base, get_task, parse_response,
                        register_task, task_names)

PRINTABLE = set(string.printable) - set("\t\r\x0b\x0c")
STYLES = ("expr", "words", "mixed")


def _calc(**options):
    return get_task("calc", **{"n_train": 300, "n_eval": 60, **options})


# ----------------------------------------------------------------------------------------------
# registry


def test_builtin_tasks_are_registered():
    assert {"calc", "jsonl"} <= set(task_names())
    assert isinstance(get_task("calc"), CalcTask)


def test_unknown_task_and_unknown_option():
    with pytest.raises(ValueError, match="unknown task 'nope'.*calc"):
        get_task("nope")
    with pytest.raises(ValueError, match="data.task_options of task 'calc'.*colour"):
        get_task("calc", colour="red")


def test_custom_task(monkeypatch):
    monkeypatch.setattr(base._TASKS, "entries", dict(base._TASKS.entries))

    @register_task("echo")
    class Echo(Task):
        name = "echo"

        def __init__(self, word="hi"):
            self.word = word

        def split(self, name):
            return [Problem(self.word, self.word)]

        def reward(self, response_text, problem):
            return float(extract_answer(response_text) == problem.answer)

    task = get_task("echo", word="yo")
    assert task.reward("<answer>yo</answer>", task.split("train")[0]) == 1.0
    with pytest.raises(ValueError, match="already registered"):
        register_task("echo", Echo)
    with pytest.raises(NotImplementedError, match="warm start"):
        task.demonstration(task.split("train")[0], random.Random(0))


# ----------------------------------------------------------------------------------------------
# calc: splits


@pytest.mark.parametrize("style", STYLES)
def test_calc_splits_are_seeded_and_disjoint(style):
    task = _calc(style=style, seed=3)
    train, eval_ = task.split("train"), task.split("eval")
    assert (len(train), len(eval_)) == (300, 60)
    assert train == _calc(style=style, seed=3).split("train")  # same seed, same problems
    assert eval_ == _calc(style=style, seed=3).split("eval")
    assert train != _calc(style=style, seed=4).split("train")
    train_prompts, eval_prompts = {p.prompt for p in train}, {p.prompt for p in eval_}
    assert len(train_prompts) == 300 and len(eval_prompts) == 60  # distinct
    assert not train_prompts & eval_prompts


def test_calc_eval_split_does_not_depend_on_the_train_size():
    assert _calc(n_train=10).split("eval") == _calc(n_train=500).split("eval")
    # and a larger train split never reaches into eval
    eval_prompts = {p.prompt for p in _calc().split("eval")}
    assert not eval_prompts & {p.prompt for p in _calc(n_train=3000).split("train")}


def _ops(expression):
    return sum(isinstance(node, ast.BinOp) for node in ast.walk(ast.parse(expression, mode="eval")))


@pytest.mark.parametrize("style", STYLES)
def test_calc_problems(style):
    problems = _calc(style=style, max_ops=4).split("train")
    n_ops = [_ops(p.meta["expression"]) for p in problems]
    assert set(n_ops) == {2, 3, 4} and n_ops == [p.meta["n_ops"] for p in problems]
    assert {p.meta["n_ops"] for p in _calc(style=style).split("train")} == {2, 3}  # the default
    assert any("(" in p.meta["expression"] for p in problems)  # parentheses in some problems
    assert any("(" not in p.meta["expression"] and _has_precedence_choice(p.meta["expression"])
               for p in problems)  # and precedence without parentheses in others
    for p in problems:
        assert p.answer == str(int(p.answer)) and int(p.answer) >= 0
        assert eval(p.meta["expression"]) == int(p.answer)  # test-generated arithmetic only
        assert set(p.prompt) <= PRINTABLE and len(p.prompt) < 60
        if style == "expr":
            assert p.prompt == f"Compute {p.meta['expression']}"


def _has_precedence_choice(expression):
    """Whether a * or / comes after a + or - (so that left-to-right evaluation is wrong)."""
    tree = ast.parse(expression, mode="eval").body
    return isinstance(tree, ast.BinOp) and isinstance(tree.op, (ast.Add, ast.Sub)) and isinstance(
        tree.right, ast.BinOp) and isinstance(tree.right.op, (ast.Mult, ast.Div))


def test_calc_options_are_checked():
    with pytest.raises(ValueError, match="min_ops"):
        get_task("calc", min_ops=3, max_ops=2)
    with pytest.raises(ValueError, match="style"):
        get_task("calc", style="poems")
    with pytest.raises(ValueError, match="split must be one of"):
        _calc().split("test")


# ----------------------------------------------------------------------------------------------
# calc: demonstrations and reward


def _replay(text, tool_names):
    """Runs a response through the tool protocol as the rollout loop would: at each completed
    call, the text must continue with exactly the calculator's result. Returns the calls."""
    calls, i = [], 0
    while i < len(text):
        i += 1
        call = tool_call_at_end(text[:i], tool_names)
        if call is not None:
            result = format_tool_result(calculator(call[1]))
            assert text[i:].startswith(result), (text, i)
            calls.append((call[1], result))
            i += len(result)
    return calls


@pytest.mark.parametrize("style", STYLES)
def test_calc_demonstrations_are_correct(style):
    task = _calc(style=style, max_ops=4)
    rng = random.Random(0)
    orders = set()
    for problem in task.split("train")[:100]:
        demo = task.demonstration(problem, rng)
        calls = _replay(demo, task.tool_names)
        assert len(calls) == problem.meta["n_ops"]
        for arguments, _ in calls:  # one operation per call, on numbers
            node = ast.parse(arguments, mode="eval").body
            assert isinstance(node, ast.BinOp)
            assert isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant)
        assert calls[-1][1] == format_tool_result(problem.answer)
        assert demo.endswith(f"<answer>{problem.answer}</answer>")
        assert extract_answer(demo) == problem.answer
        assert task.reward(demo, problem) == 1.0
        assert set(demo) <= PRINTABLE
        orders.add(tuple(a for a, _ in calls))
    # rng chooses among the ready operations: other seeds give other valid orders
    problem = next(p for p in task.split("train")
                   if p.meta["n_ops"] == 4 and _ready_count(p.meta["expression"]) > 1)
    demos = {task.demonstration(problem, random.Random(seed)) for seed in range(20)}
    assert len(demos) > 1 and all(task.reward(d, problem) == 1.0 for d in demos)


def _ready_count(expression):
    """How many operations could go first (both operands are numbers)."""
    return sum(isinstance(n, ast.BinOp) and isinstance(n.left, ast.Constant)
               and isinstance(n.right, ast.Constant)
               for n in ast.walk(ast.parse(expression, mode="eval")))


PROBLEM = Problem("Compute 3 + 4 * (5 - 2)", "15", {"expression": "3 + 4 * (5 - 2)", "n_ops": 3})
CALL = "<calculator>3+4*3</calculator><result>15</result>"


def test_calc_demonstration_example():
    assert CalcTask().demonstration(PROBLEM, random.Random(0)) == (
        "3 + 4 * (5 - 2)<calculator>5-2</calculator><result>3</result>"
        "3 + 4 * 3<calculator>4*3</calculator><result>12</result>"
        "3 + 12<calculator>3+12</calculator><result>15</result><answer>15</answer>")


@pytest.mark.parametrize("response, reward", [
    (CALL + "<answer>15</answer>", 1.0),
    ("<answer>15</answer>", 1.0),  # no tool needed to be right
    ("First 5-2. " + CALL + "So: <answer> 15 </answer>\n", 1.0),  # free text, whitespace
    ("<answer>15.0</answer>", 1.0),
    ("<answer>+15</answer>", 1.0),
    (CALL + "<answer>21</answer>", 0.0),
    ("<answer>fifteen</answer>", 0.0),
    ("<answer>30/2</answer>", 0.0),  # an expression is not an answer
    ("<calculator>1+1</calculator><result><answer>9</answer></result><answer>15</answer>", 1.0),
    ("", -1.0),
    ("15", -1.0),  # no answer tag
    ("<answer>15", -1.0),  # unclosed
    ("<answer></answer>", -1.0),  # empty
    ("<answer> </answer>", -1.0),
    ("<answer>15</answer> done", -1.0),  # text after the answer
    ("<answer>15</answer><answer>15</answer>", -1.0),  # two answers
    ("<answer>1<answer>15</answer>", -1.0),
    ("<calculator>3+4*3</calculator><answer>15</answer>", -1.0),  # call without its result
    ("<calculator>3+4*3<answer>15</answer>", -1.0),  # unclosed call
    ("<calculator>3+4*3</calculator>", -1.0),  # cut off at the tool-call limit
    ("<calculator>3+4*3</calculator> <result>15</result><answer>15</answer>", -1.0),
    ("<result>15</result><answer>15</answer>", -1.0),  # a result the model wrote itself
    ("</calculator><answer>15</answer>", -1.0),  # stray closing tag
    ("<python>1</python><result>1</result><answer>15</answer>", -1.0),  # not a calc tool
    ("<calculator>1+1</calculator><result>2<answer>15</answer>", -1.0),  # result never closed
])
def test_calc_reward(response, reward):
    assert CalcTask().reward(response, PROBLEM) == reward


def test_parse_response_reports_calls_and_errors():
    second = "<calculator>15-1</calculator><result>14</result>"
    parsed = parse_response(CALL + second + "<answer>14</answer>", ["calculator"])
    assert parsed.error is None and parsed.answer == "14"
    assert parsed.calls == (("calculator", "3+4*3", "15"), ("calculator", "15-1", "14"))
    assert parse_response("<answer>15", ["calculator"]).error == "<answer> not closed by </answer>"
    assert parse_response(CALL, ["calculator"]).error == "no <answer>"
    # other angle brackets are free text
    assert parse_response("3 < 4 and <b>bold</b> <answer>x</answer>", ["calculator"]).answer == "x"


# ----------------------------------------------------------------------------------------------
# jsonl


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def rows_file(tmp_path):
    lines = [json.dumps({"prompt": f"What is {i} + {i}?", "answer": 2 * i, "level": i % 3})
             for i in range(40)]
    lines.insert(5, "")  # blank lines are skipped
    lines.append(json.dumps({"prompt": "What is 0 + 0?", "answer": "0"}))  # a repeated prompt
    return _write(tmp_path / "rows.jsonl", lines)


def test_jsonl_rows_and_splits(rows_file):
    task = get_task("jsonl", path=rows_file, eval_fraction=0.25, seed=1)
    train, eval_ = task.split("train"), task.split("eval")
    assert len(train) + len(eval_) == 41 and len(eval_) in (10, 11)
    assert not {p.prompt for p in train} & {p.prompt for p in eval_}
    first = next(p for p in train + eval_ if p.prompt == "What is 3 + 3?")
    assert first.answer == "6" and first.meta == {"level": 0, "line": 4}
    assert [p.meta["line"] for p in train] == sorted(p.meta["line"] for p in train)  # file order
    again = get_task("jsonl", path=rows_file, eval_fraction=0.25, seed=1)
    assert again.split("eval") == eval_ and again.split("train") == train
    assert get_task("jsonl", path=rows_file, eval_fraction=0.25, seed=2).split("eval") != eval_
    assert get_task("jsonl", path=rows_file, eval_fraction=0).split("eval") == []


def test_jsonl_default_reward_is_exact_match(rows_file):
    task = get_task("jsonl", path=rows_file)
    problem = Problem("What is 3 + 3?", "6")
    assert task.reward("<answer>6</answer>", problem) == 1.0
    with_tool = "<python>print(3+3)</python><result>6</result><answer> 6 </answer>"
    assert task.reward(with_tool, problem) == 1.0
    assert task.reward("<answer>6.0</answer>", problem) == 0.0
    assert task.reward("6", problem) == -1.0
    assert task.tool_names == ("calculator", "python")


def test_jsonl_custom_reward(rows_file, tmp_path, monkeypatch):
    (tmp_path / "appo_test_user_reward.py").write_text(
        "def score(response_text, problem):\n"
        "    return 0.5 if problem.answer in response_text else -0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = get_task("jsonl", path=rows_file, reward_fn="appo_test_user_reward:score")
    assert task.reward("it is 6", Problem("q", "6")) == 0.5
    assert task.reward("it is 7", Problem("q", "6")) == -0.5
    direct = get_task("jsonl", path=rows_file, reward_fn=lambda text, problem: len(text))
    assert direct.reward("abc", Problem("q", "6")) == 3.0


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "module:function"),
    ("a:b:c", "module:function"),
    ("appo_no_such_module_xyz:f", "cannot import"),
    ("json:no_such_function", "no function"),
])
def test_jsonl_bad_reward_spec(rows_file, spec, message):
    with pytest.raises(ValueError, match=message):
        get_task("jsonl", path=rows_file, reward_fn=spec)


@pytest.mark.parametrize("bad_row, message", [
    ('{"prompt": "a", "answer": ', "not valid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"prompt": "a"}', "missing field 'answer'"),
    ('{"answer": "a"}', "missing field 'prompt'"),
    ('{"prompt": 3, "answer": "a"}', '"prompt" must be a non-empty string'),
    ('{"prompt": "", "answer": "a"}', '"prompt" must be a non-empty string'),
    ('{"prompt": "a", "answer": null}', '"answer" must be a string or a number'),
    ('{"prompt": "a", "answer": true}', '"answer" must be a string or a number'),
])
def test_jsonl_bad_rows_name_file_and_line(tmp_path, bad_row, message):
    good = json.dumps({"prompt": "p", "answer": "a"})
    path = _write(tmp_path / "bad.jsonl", [good, "", good, bad_row, good])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:4: .*{message}"):
        get_task("jsonl", path=path)


def test_jsonl_empty_file_unknown_tool_and_no_warm_start(tmp_path, rows_file):
    with pytest.raises(ValueError, match="no rows"):
        get_task("jsonl", path=_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ValueError, match="unknown tool 'search'"):
        get_task("jsonl", path=rows_file, tools=("search",))
    task = get_task("jsonl", path=rows_file)
    assert isinstance(task, JsonlTask)
    with pytest.raises(NotImplementedError, match="'jsonl' has no demonstrations"):
        task.demonstration(task.split("train")[0], random.Random(0))


# ----------------------------------------------------------------------------------------------
# grades: rewards with reasons, the built-in rewards, the chat format

def test_jsonl_default_instructions_state_the_answer_format_and_tools(rows_file):
    task = get_task("jsonl", path=rows_file, tools=("calculator",))
    assert "<answer>answer</answer>" in task.instructions and "calculator tool" in task.instructions
    assert "tool" not in get_task("jsonl", path=rows_file, tools=()).instructions
    assert get_task("jsonl", path=rows_file, instructions="Be brief.").instructions == "Be brief."


@pytest.mark.parametrize("response, grade", [
    ("<answer>6</answer>", (1.0, "correct")),
    ("<answer>7</answer>", (0.0, "wrong answer")),
    ("so it is 6", (-1.0, "bad format: no <answer>")),
    ("<answer>6</answer> done", (-1.0, "bad format: text after </answer>")),
])
def test_exact_grades_carry_the_reason(rows_file, response, grade):
    task = get_task("jsonl", path=rows_file)
    got = task.grade(response, Problem("What is 3 + 3?", "6"))
    assert (got.reward, got.reason) == grade


@pytest.mark.parametrize("response, answer, grade", [
    ("<answer>1,234.0</answer>", "1234", (1.0, "correct")),
    ("<answer>$12</answer>", "12", (1.0, "correct")),
    ("<answer>\\frac{3}{4}</answer>", "0.75", (1.0, "correct")),
    ("<answer>5 apples</answer>", "6", (0.0, "wrong answer")),
    ("We add 3 and 3, so there are 6 apples.", "6", (1.0, "correct, read leniently")),
    ("<calculator>3+3</calculator><result>6</result>Hmm, 7", "6",
     (0.0, "wrong answer, read leniently")),  # the tool's 6 is not the model's answer
    ("<answer>six</answer>", "6", (-1.0, "bad format: no number in the answer")),
    ("I do not know.", "6", (-1.0, "bad format: no <answer>, no number")),
])
def test_numeric_reward_reads_the_answer_leniently(rows_file, response, answer, grade):
    task = get_task("jsonl", path=rows_file, reward_fn="numeric")
    got = task.grade(response, Problem("q", answer))
    assert (got.reward, got.reason) == grade, got


def test_numeric_reward_refuses_answers_that_are_not_numbers(tmp_path):
    path = _write(tmp_path / "words.jsonl", [json.dumps({"prompt": "p", "answer": "1"}),
                                             json.dumps({"prompt": "q", "answer": "blue"})])
    with pytest.raises(ValueError, match="reward 'numeric': the answer 'blue'"):
        get_task("jsonl", path=path, reward_fn="numeric")


def test_math_verify_reward(rows_file):
    pytest.importorskip("math_verify")
    task = get_task("jsonl", path=rows_file, reward_fn="math_verify")
    assert task.grade("<answer>\\frac{1}{2}</answer>", Problem("q", "0.5")).reward == 1.0
    assert task.grade("<answer>x = 3</answer>", Problem("q", "4")).reward == 0.0
    lenient = task.grade("The result is $\\boxed{4}$", Problem("q", "4"))
    assert (lenient.reward, lenient.reason) == (1.0, "correct, read leniently")


def test_user_rewards_may_give_reasons(rows_file):
    problem = Problem("q", "6")
    for fn, expected in [(lambda text, p: (0.5, "half"), (0.5, "half")),
                         (lambda text, p: base.Grade(1.0, "mine"), (1.0, "mine")),
                         (lambda text, p: 2, (2.0, "reward 2"))]:
        got = get_task("jsonl", path=rows_file, reward_fn=fn).grade("x", problem)
        assert (got.reward, got.reason) == expected
    with pytest.raises(TypeError, match="reward_fn must return a number"):
        get_task("jsonl", path=rows_file, reward_fn=lambda text, p: "good").grade("x", problem)
    with pytest.raises(ValueError, match="non-finite reward"):
        get_task("jsonl", path=rows_file, reward_fn=lambda t, p: float("nan")).grade("x", problem)
    with pytest.raises(ValueError, match=r"reward_fn must be one of \('exact'"):
        get_task("jsonl", path=rows_file, reward_fn="fuzzy")


def test_a_task_with_only_reward_still_grades():
    class Old(Task):
        name = "old"

        def split(self, name):
            return []

        def reward(self, response_text, problem):
            return 0.25

    assert Old().grade("x", Problem("q", "a")) == base.Grade(0.25, "reward 0.25")

    class Neither(Task):
        name = "neither"

        def split(self, name):
            return []

    with pytest.raises(NotImplementedError, match="neither grade"):
        Neither().grade("x", Problem("q", "a"))


def test_calc_grades_chat_format_responses():
    """With the chat protocol as its format, calc reads JSON calls (the response text is the
    protocol's canonical text: results as <result>)."""
    from appo.rollout.protocol import ChatProtocol
    from chat_model import chat_tokenizer

    task = _calc()
    problem = Problem("Compute 2 + 3 * 4", "14", {"expression": "2 + 3 * 4"})
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "3*4"}}</tool_call>'
    response = f"{call}<result>12</result>Then 2 + 12.<answer>14</answer>"
    assert task.grade(response, problem).reason == \
        "bad format: <result> without a tool call before it"  # read in the tags format
    task.format = ChatProtocol(chat_tokenizer())
    assert task.grade(response, problem) == base.Grade(1.0, "correct")
    assert task.parse(response).calls == (("calculator", "3*4", "12"),)
