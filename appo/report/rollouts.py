"""`rollouts.html`: a static page of sampled rollouts, each token shaded by its branching score
(docs/algorithm.md) and the chosen branch points marked, with every branch under its parent rollout.

One self-contained file (inline CSS, no script, no external resource) that a browser opens from
disk; it is rewritten atomically after every `add_step`, keeping the last `keep_steps` steps and,
by default, the first step the report was given (to compare the start of the run with now).
"""

from __future__ import annotations

import html
import math
import time
from pathlib import Path
from typing import Optional, Sequence, Union

from ._atomic import atomic_open

ROLLOUTS_FILE = "rollouts.html"
# shading at |normalised score| = 1; 0 is white (RdBu-like ends, light enough for black text)
WARM_RGB = (232, 98, 62)
COOL_RGB = (66, 133, 222)
SHADE_LEVELS = 10  # shades per sign: a class per level keeps the page small (tooltips hold values)
PREFIX_CONTEXT_TOKENS = 8  # tokens of the parent shown before a branch's continuation
NEWLINE_MARK = "↵"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d1d1f;margin:0 auto;
 max-width:1150px;padding:1em 1.5em 4em}
h1{margin:.2em 0 0;font-size:1.5em}
.sub{color:#666;margin:.2em 0 1em}
.legend{display:flex;flex-wrap:wrap;gap:.4em 1.6em;align-items:center;padding:.6em .9em;
 background:#f6f6f8;border-radius:6px;font-size:13px}
.scale{display:inline-flex;align-items:center;gap:.4em}
.bar{display:inline-block;width:180px;height:12px;border:1px solid #bbb;border-radius:2px;
 background:linear-gradient(to right,rgb%(cool)s,#fff,rgb%(warm)s)}
nav{margin:1em 0;font-size:13px}
nav a{margin-right:.8em}
details.step{border-top:2px solid #333;margin-top:1.5em}
details.step>summary{font-size:1.2em;font-weight:600;padding:.5em 0;cursor:pointer}
.stat{font-weight:400;color:#555;font-size:.85em}
.group{margin:.6em 0 1.8em;padding-left:.2em}
.group h3{margin:.4em 0;font-size:1.02em}
.answer{margin:.2em 0 .6em;color:#444}
.toks{font:13px/1.75 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;
 overflow-wrap:anywhere}
.prompt{max-height:14em;overflow:auto;background:#f6f6f8;padding:.4em .6em;border-radius:4px}
.rollout{border-left:3px solid #d8d8de;margin:.9em 0;padding:.1em 0 .1em .8em}
.rhead{font-size:13px;color:#444;margin-bottom:.2em}
.reward{font-weight:700}
.why{color:#333}
.cut{font-size:11px;color:#fff;background:#b35900;border-radius:3px;padding:0 4px}
.pos{color:#1a7f37}.neg{color:#c62828}.zero{color:#666}
.toks>span{border-radius:2px}
.p{color:#888;font-style:italic}
.r{color:#6b6b6b;font-style:italic;background:#e9efe6;border:1px dashed #9ab08f;border-radius:3px}
.bp{outline:2px solid #111;outline-offset:-1px}
.bp sup,.mark{font:700 9px/1 system-ui,sans-serif;color:#fff;background:#111;border-radius:6px;
 padding:1px 3px;font-style:normal}
ol.branches{list-style:none;margin:.4em 0 .2em;padding-left:1.2em}
ol.branches li{margin:.35em 0;padding-left:.6em;border-left:2px dotted #aaa}
.ctx{opacity:.45}
"""


class RolloutsPage:
    """Writes `path` (an .html file) from the rollout groups of recent steps.

    `add_step(step, groups)` takes one entry per prompt:

        {"prompt": str, "answer": str,
         "rollouts": [{"tokens": [str], "model": [bool], "score": [float | None],
                       "entropy": [float | None],   # optional, shown in the tooltip
                       "logprob": [float | None],   # optional, shown in the tooltip
                       "reward": float, "branch_points": [int]}],   # indices into tokens
         "branches": [{"parent": int, "position": int, "text": str, "reward": float}]}

    `tokens` are the response tokens as text; `model` is False for tool-result tokens (and for
    prompt tokens, if the caller includes them: non-model tokens before the first model token are
    shown as prompt). Scores are normalised per rollout by its largest |score|; None or
    non-finite scores are not shaded. A branch forks after its parent's token `position` (that
    token kept, docs/algorithm.md). Adding a step at or before the latest one replaces it and drops
    the
    later ones (a resumed run).
    """

    def __init__(self, path: Union[str, Path], keep_steps: int = 5, *, keep_first: bool = True,
                 title: Optional[str] = None, info: Optional[str] = None):
        if keep_steps < 1:
            raise ValueError(f"keep_steps must be >= 1, got {keep_steps}")
        self.path = Path(path)
        self.info = info  # a line under the title (the run's tool format, say)
        self.keep_steps = keep_steps
        self.keep_first = keep_first
        self.title = title if title is not None else self.path.resolve().parent.name
        self._sections: dict[int, str] = {}  # step -> its rendered <details>
        self._first: Optional[tuple[int, str]] = None

    def add_step(self, step: int, groups: Sequence[dict]) -> None:
        _check_groups(groups)
        section = _render_step(step, groups)
        self._sections = {s: html_ for s, html_ in self._sections.items() if s < step}
        self._sections[step] = section
        for old in sorted(self._sections)[:-self.keep_steps]:
            del self._sections[old]
        if self.keep_first and (self._first is None or self._first[0] >= step):
            self._first = (step, section)
        with atomic_open(self.path, "w", encoding="utf-8") as f:
            f.write(self._page())

    def _page(self) -> str:
        steps = sorted(self._sections, reverse=True)
        sections = [self._sections[s].replace("<details", "<details open", 1) if i == 0
                    else self._sections[s] for i, s in enumerate(steps)]
        shown = list(steps)
        if self._first is not None and self._first[0] not in self._sections:
            sections.append(self._first[1].replace("</summary>", " · first step</summary>", 1))
            shown.append(self._first[0])
        title = html.escape(self.title)
        info = f'<p class="sub toks">{_visible(self.info)}</p>\n' if self.info else ""
        nav = " ".join(f'<a href="#step-{s}">step {s}</a>' for s in shown)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width,initial-scale=1">'
                f"<title>{title} · rollouts</title>"
                f"<style>{_CSS % {'warm': WARM_RGB, 'cool': COOL_RGB}}{_shade_css()}</style>"
                f"</head><body>\n"
                f"<h1>{title}</h1>\n<p class=\"sub\">sampled rollouts · latest step {steps[0]}"
                f" · updated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>\n{info}{_LEGEND}\n"
                f"<nav>{nav}</nav>\n" + "\n".join(sections) + "\n</body></html>\n")


_LEGEND = (
    '<div class="legend"><span class="scale">score &lt; 0 <span class="bar"></span> score &gt; 0'
    "</span><span>branching score, normalised per rollout by its largest |score|; hover a token"
    ' for its values</span><span><span class="bp">tok<sup>1</sup></span> chosen branch point'
    '</span><span class="toks"><span class="r">tool result</span> <span class="p">prompt</span>'
    "</span><span>unshaded: not scored</span></div>")


def _check_groups(groups: Sequence[dict]) -> None:
    if not isinstance(groups, (list, tuple)):
        raise TypeError(f"groups must be a list of dicts, got {type(groups).__name__}")
    for g, group in enumerate(groups):
        where = f"groups[{g}]"
        _require_keys(group, where, ("prompt", "rollouts"))
        rollouts = group["rollouts"]
        for r, rollout in enumerate(rollouts):
            at = f"{where}.rollouts[{r}]"
            _require_keys(rollout, at, ("tokens", "model", "score", "reward"))
            n = len(rollout["tokens"])
            for key in ("model", "score", "entropy", "logprob"):
                if rollout.get(key) is not None and len(rollout[key]) != n:
                    raise ValueError(f"{at}.{key}: expected one entry per token ({n}), "
                                     f"got {len(rollout[key])}")
            for p in rollout.get("branch_points", ()):
                if not 0 <= p < n:
                    raise ValueError(f"{at}.branch_points: {p} is not a token index (0..{n - 1})")
        for b, branch in enumerate(group.get("branches", ())):
            at = f"{where}.branches[{b}]"
            _require_keys(branch, at, ("parent", "position", "text", "reward"))
            if not 0 <= branch["parent"] < len(rollouts):
                raise ValueError(f"{at}.parent: {branch['parent']} is not a rollout index "
                                 f"(0..{len(rollouts) - 1})")
            n = len(rollouts[branch["parent"]]["tokens"])
            if not 0 <= branch["position"] < n:
                raise ValueError(f"{at}.position: {branch['position']} is not a token index "
                                 f"of its parent (0..{n - 1})")


def _require_keys(item, where: str, keys: tuple[str, ...]) -> None:
    if not isinstance(item, dict):
        raise TypeError(f"{where} must be a dict, got {type(item).__name__}")
    missing = [k for k in keys if k not in item]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(map(repr, missing))}")


def _visible(text: str) -> str:
    """Escaped text for a white-space:pre-wrap block: newlines shown as ↵ (and kept as breaks),
    other control characters as their Unicode control pictures (U+2400 block)."""
    out = []
    for ch in str(text):
        if ch == "\n":
            out.append(NEWLINE_MARK + "\n")
        elif ch != "\t" and (ord(ch) < 0x20 or ch == "\x7f"):
            out.append("\u2421" if ch == "\x7f" else chr(0x2400 + ord(ch)))
        else:
            out.append(ch)
    return html.escape("".join(out), quote=True)


def _number(value) -> Optional[float]:
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _reward(value) -> str:
    value = _number(value)
    if value is None:
        return '<span class="reward zero">–</span>'
    sign = "pos" if value > 0 else "neg" if value < 0 else "zero"
    return f'<span class="reward {sign}">{value:.3g}</span>'


def _mean(values) -> Optional[float]:
    values = [v for v in map(_number, values) if v is not None]
    return sum(values) / len(values) if values else None


def _shade_class(x: float) -> str:
    """The class of a normalised score x in [-1, 1]: "w3" warm level 3, "c7" cool level 7, ""
    for level 0 (white)."""
    level = round(min(abs(x), 1.0) * SHADE_LEVELS)
    return "" if level == 0 else f"{'w' if x > 0 else 'c'}{level}"


def _shade_css() -> str:
    rules = []
    for prefix, end in (("w", WARM_RGB), ("c", COOL_RGB)):
        for level in range(1, SHADE_LEVELS + 1):
            a = level / SHADE_LEVELS
            r, g, b = (round(255 + a * (c - 255)) for c in end)
            rules.append(f".{prefix}{level}{{background:#{r:02x}{g:02x}{b:02x}}}")
    return "\n".join(rules)


def _render_step(step: int, groups: Sequence[dict]) -> str:
    rewards = [r["reward"] for g in groups for r in g["rollouts"]]
    branch_rewards = [b["reward"] for g in groups for b in g.get("branches", ())]
    stats = [f"{len(groups)} prompts", f"{len(rewards)} rollouts",
             f"{len(branch_rewards)} branches"]
    for name, values in (("reward", rewards), ("branch reward", branch_rewards)):
        mean = _mean(values)
        if mean is not None:
            stats.append(f"mean {name} {mean:.3g}")
    body = "".join(_render_group(i, g) for i, g in enumerate(groups))
    return (f'<details class="step" id="step-{step}"><summary>step {step} '
            f'<span class="stat">· {" · ".join(stats)}</span></summary>{body}</details>')


def _render_group(index: int, group: dict) -> str:
    answer = group.get("answer")
    parts = [f'<section class="group"><h3>prompt {index + 1}</h3>',
             f'<div class="toks prompt">{_visible(group["prompt"])}</div>']
    if answer is not None and answer != "":
        parts.append(f'<p class="answer">answer: <span class="toks">{_visible(answer)}'
                     f"</span></p>")
    branches = group.get("branches", ())
    for r, rollout in enumerate(group["rollouts"]):
        own = sorted((b for b in branches if b["parent"] == r), key=lambda b: b["position"])
        parts.append(_render_rollout(r, rollout, own))
    parts.append("</section>")
    return "".join(parts)


def _render_rollout(index: int, rollout: dict, branches: list[dict]) -> str:
    tokens = rollout["tokens"]
    # markers number the fork positions in token order; a branch's own position always has one
    forks = sorted(set(rollout.get("branch_points", ())) | {b["position"] for b in branches})
    marker = {p: k + 1 for k, p in enumerate(forks)}
    n_model = sum(map(bool, rollout["model"]))
    head = (f'<div class="rhead">rollout {index + 1} · reward {_reward(rollout["reward"])}'
            f'{_why(rollout)} · {len(tokens)} tokens ({n_model} model) · {len(branches)} branches'
            f"</div>")
    items = []
    for b in branches:
        p = b["position"]
        start = max(0, p + 1 - PREFIX_CONTEXT_TOKENS)
        context = _render_tokens(rollout, marker, range(start, p + 1))
        items.append(f'<li><span class="mark">{marker[p]}</span> fork after token {p} · reward '
                     f'{_reward(b["reward"])}{_why(b)}<div class="toks"><span class="ctx">'
                     f'{"…" if start else ""}{context}</span>{_visible(b["text"])}</div></li>')
    branch_list = f'<ol class="branches">{"".join(items)}</ol>' if items else ""
    body = _render_tokens(rollout, marker, range(len(tokens)))
    return f'<div class="rollout">{head}<div class="toks">{body}</div>{branch_list}</div>'


def _why(item: dict) -> str:
    """The reward's reason (its detail in the tooltip) and a finish mark, if the item has them."""
    out = ""
    if item.get("reason"):
        tip = f' title="{html.escape(str(item["detail"]))}"' if item.get("detail") else ""
        out += f' · <span class="why"{tip}>{html.escape(str(item["reason"]))}</span>'
    if item.get("finish"):
        out += f' <span class="cut">{html.escape(str(item["finish"]))}</span>'
    return out


def _render_tokens(rollout: dict, marker: dict[int, int], positions: range) -> str:
    tokens, model, scores = rollout["tokens"], rollout["model"], rollout["score"]
    entropy, logprob = rollout.get("entropy"), rollout.get("logprob")
    finite = [abs(s) for s in map(_number, scores) if s is not None]
    scale = max(finite, default=0.0) or 1.0
    first_model = next((i for i, m in enumerate(model) if m), len(tokens))
    out, run = [], []  # run: consecutive non-model tokens, drawn as one span

    def close_run(i: int) -> None:
        if run:
            kind = ("p", "prompt") if i <= first_model else ("r", "tool result, not scored")
            out.append(f'<span class="{kind[0]}" title="{kind[1]}">{"".join(run)}</span>')
            run.clear()

    for i in positions:
        if not model[i] and i not in marker:
            run.append(_visible(tokens[i]))
            continue
        close_run(i)
        score = _number(scores[i])
        tip = [f"#{i}"]
        for name, values in (("score", scores), ("entropy", entropy), ("logprob", logprob)):
            value = None if values is None else _number(values[i])
            if value is not None:
                tip.append(f"{name} {value:.3g}")
        classes = [] if score is None else [_shade_class(score / scale)]
        text = _visible(tokens[i])
        if i in marker:
            classes.append("bp")
            text += f"<sup>{marker[i]}</sup>"
            tip.append(f"branch point {marker[i]}")
        class_names = " ".join(c for c in classes if c)
        attrs = f' class="{class_names}"' if class_names else ""
        out.append(f'<span{attrs} title="{html.escape(" · ".join(tip))}">{text}</span>')
    close_run(positions.stop)
    return "".join(out)
