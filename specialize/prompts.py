"""Prompts the base model completes, and parsers for what it writes back.

Both generation stages use plain completion prompts by default (the method was designed for base
models, and continuing a numbered list works for base and instruct models alike). Stage 1 can also
send its request as a user turn in the model's chat template (`generate.prompt_format: chat`), and
focus each prompt on one subtopic or one corpus passage (`generate.focus`); docs/quality.md
records what each measured. Training and serving use the base model's chat template (`train.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.chat import Task, user_message  # noqa: F401 (the stages import both from here)

# ---- Stage 1: instruction generation (Self-MoE's prompt structure, see PAPER.md) ---------------

INSTRUCTION_HEADER = """\
You are asked to come up with a set of diverse task instructions about {domain}. {description}

Here are the requirements:
1. The tasks should be about {domain}, and each one a different kind of task (question answering, \
yes/no questions, multiple choice, classification, extraction, summarization, explanation, \
calculation, drafting).
2. Try not to repeat the verb for each instruction, and use diverse wording.
3. A language model must be able to complete the task with text alone: no images, files, \
drawings or web browsing.
4. Instructions are 1 to 2 sentences long, either an imperative sentence or a question.
5. When the task needs an input (a passage, a headline, figures), write a realistic input of at \
most 100 words after "Input:". Never use placeholders. Otherwise write "Input: <noinput>".
6. {focus}

List of tasks:
"""
FOCUS_NONE = "Cover many subtopics of {domain}."
FOCUS_SUBTOPIC = "Every task should be about this subtopic of {domain}: {subtopic}."
FOCUS_PASSAGE = ("Every task should be about the subject of this {domain} passage (an input may "
                 "quote it):\n{passage}")
# The chat variant's user turn ends with this; the assistant turn is then opened at item k+1.
CHAT_REQUEST = "\nContinue the list with task {next} and the next ones, in the same format."


@dataclass(frozen=True)
class Focus:
    """What one prompt asks its tasks to be about: one subtopic, one corpus passage, or (both
    empty) the whole domain as the paper's prompt does."""

    subtopic: str = ""
    passage: str = ""


def _task_block(n: int, task: Task) -> str:
    return f"{n}. Instruction: {task.instruction}\n{n}. Input: {task.input or '<noinput>'}\n"


def open_item(n: int) -> str:
    """Item n opened for the model to fill: the parser and the guided regex start inside it."""
    return f"{n}. Instruction:"


def _instruction_request(domain: str, description: str, demos: list[Task],
                         focus: Focus | None) -> str:
    focus = focus or Focus()
    if focus.passage:
        line = FOCUS_PASSAGE.format(domain=domain, passage=focus.passage.strip())
    elif focus.subtopic:
        line = FOCUS_SUBTOPIC.format(domain=domain, subtopic=focus.subtopic.strip())
    else:
        line = FOCUS_NONE.format(domain=domain)
    body = "".join(_task_block(i, t) for i, t in enumerate(demos, 1))
    return INSTRUCTION_HEADER.format(domain=domain, description=description.strip(),
                                     focus=line) + body


def build_instruction_prompt(domain: str, description: str, demos: list[Task],
                             focus: Focus | None = None) -> str:
    """Header, the sampled demos numbered 1..k, then an opened item k+1 for the model to fill."""
    return _instruction_request(domain, description, demos, focus) + open_item(len(demos) + 1)


def build_instruction_chat_turn(domain: str, description: str, demos: list[Task],
                                focus: Focus | None = None) -> str:
    """The same request as one user turn, asking for the list to go on from item k+1. The caller
    wraps it in the chat template and opens item k+1 in the assistant turn, so the reply parses
    (and is guided) exactly like a list completion."""
    return (_instruction_request(domain, description, demos, focus)
            + CHAT_REQUEST.format(next=len(demos) + 1))


def subtopics(description: str) -> list[str]:
    """The subtopics a domain description lists: its first sentence after the colon, split at
    commas and semicolons outside parentheses ("anatomy and physiology, pharmacology (drug
    classes, ...), genetics" -> 3). A description without such a list is one subtopic."""
    first = description.strip().split(". ")[0]
    if ":" not in first:
        return [description.strip()]
    parts, depth, cur = [], 0, ""
    for ch in first.split(":", 1)[1]:
        depth += (ch == "(") - (ch == ")")
        if ch in ",;" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    names = [re.sub(r"^(and|or)\s+", "", p.strip().rstrip(".")).strip() for p in parts]
    names = [n for n in names if len(n) > 2]
    return names if len(names) >= 2 else [description.strip()]


def numbered_list_regex(head: str, item, first: int, max_items: int) -> str:
    """`head` (the rest of item `first`, whose number is in the prompt), then up to
    `max_items - 1` more items `item(n)`, numbered in order: each optional only after the one
    before it."""
    tail = ""
    for n in reversed(range(first + 1, first + max_items)):
        tail = rf"(?:{item(n)}{tail})?"
    return head + tail


def instruction_list_regex(first: int, max_items: int) -> str:
    """A regex for vLLM's structured outputs that only admits a well-formed continuation:
    item `first` (its "Instruction:" is in the prompt), then up to `max_items - 1` more, each with
    its "Input:" line and consecutive numbers. Weak models then cannot derail the list format,
    while the words inside each line stay the model's own."""
    line = r"[^\n]{8,240}\n"
    inp = r"Input: [^\n]{0,400}\n"
    return numbered_list_regex(rf" {line}{first}\. {inp}",
                               lambda n: rf"{n}\. Instruction: {line}{n}\. {inp}",
                               first, max_items)


_ITEM_START = re.compile(r"^\s*(?:\*\*)?\s*(\d{1,3})\s*[.):]\s*", re.MULTILINE)
_FIELD = re.compile(r"^(?:\*\*)?\s*(instruction|input|output|response|answer)\s*(?:\*\*)?\s*:\s*",
                    re.IGNORECASE)
_NO_INPUT = {"<noinput>", "noinput", "none", "n/a", "no input", "<no input>", "-", ""}


def parse_instruction_list(completion: str, first_number: int, truncated: bool) -> list[Task]:
    """Parse the model's continuation of the numbered list into tasks.

    The completion starts inside item `first_number` (its "Instruction:" was in the prompt).
    Tolerates: "N. Instruction:" / "N. Input:" lines, bare "N." items, markdown bold, missing
    inputs, stray Output lines (dropped). A final item cut off by the token limit is dropped.
    """
    text = f"{first_number}. Instruction:" + completion
    starts = list(_ITEM_START.finditer(text))
    # Group consecutive segments by their item number ("4. Instruction", "4. Input" -> item 4).
    items: dict[int, dict[str, str]] = {}
    order: list[int] = []
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        num, seg = int(m.group(1)), text[m.end():end]
        fm = _FIELD.match(seg)
        field = fm.group(1).lower() if fm else "instruction"
        value = seg[fm.end():] if fm else seg
        if num not in items:
            items[num] = {}
            order.append(num)
        items[num].setdefault(field, value.strip())
    if truncated and order:
        items.pop(order.pop())  # the last one ran into the token limit: incomplete
    tasks = []
    for num in order:
        if num < first_number:
            continue  # the model restarted the list from 1 and copied the demos
        fields = items[num]
        instruction = _clean(fields.get("instruction", ""))
        raw_input = _clean(fields.get("input", ""))
        if not instruction:
            continue
        tasks.append(Task(instruction, "" if raw_input.lower() in _NO_INPUT else raw_input))
    return tasks


def _clean(s: str) -> str:
    s = s.split("\n\n")[0]  # a blank line ends a field; anything after is the model rambling
    s = s.replace("**", "").strip().strip('"').strip()
    return re.sub(r"\s+", " ", s)


# ---- Stage 3: response generation (persona + 5 seed demos, greedy) -----------------------------

RESPONSE_HEADER = ("You are an expert in {domain}. {description}\n"
                   "Answer each instruction accurately and concisely, as an expert would.\n\n")
RESPONSE_STOP = ["### Instruction", "\n###", "<|im_end|>", "<|endoftext|>"]


def _example(task: Task, response: str | None) -> str:
    s = f"### Instruction:\n{task.instruction}\n\n"
    if task.input:
        s += f"### Input:\n{task.input}\n\n"
    s += "### Response:\n" + (f"{response}\n\n" if response is not None else "")
    return s


def build_response_prompt(domain: str, description: str, demos: list[tuple[Task, str]],
                          task: Task, passages: list[str] | None = None) -> str:
    prompt = RESPONSE_HEADER.format(domain=domain, description=description.strip())
    prompt += "".join(_example(t, r) for t, r in demos)
    if passages:
        # Knowledge-infused variant: retrieved domain passages before the new instruction only,
        # so the model grounds this answer without the demos learning to expect them.
        prompt += "### Background:\n" + "\n\n".join(f"[{i}] {p}" for i, p in
                                                     enumerate(passages, 1)) + "\n\n"
    return prompt + _example(task, None)


def clean_response(text: str) -> str:
    for stop in RESPONSE_STOP:
        text = text.split(stop)[0]
    return text.strip()
