"""The user turn an expert sees: training renders it, and evaluation asks in the same words.

Both halves must build the same text or the measured gain is of a different prompt than the one
trained on, so the rendering lives here, once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    instruction: str
    input: str = ""


def user_message(task: Task) -> str:
    """One user turn: the instruction, then the input (how a user would paste both)."""
    return f"{task.instruction}\n\n{task.input}" if task.input else task.instruction
