"""Shared fixtures. Unit tests use fakes; tests under tests/integration use real components."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from core.engine import Completion

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent


def write_domain(root: Path, name: str = "demo", n: int = 10, **extra) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    seeds = [{"instruction": f"Explain topic number {i} of the {name} field in plain words.",
              "output": f"Topic {i} is a core idea of {name}; here is a short explanation."}
             for i in range(n)]
    doc = {"domain": name, "description": f"The {name} domain: core ideas explained clearly "
           "for practitioners.", "seeds": seeds, **extra}
    (folder / "seeds.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


class FakeGenerator:
    """Writes numbered instructions (unique per call) or canned answers; records its calls."""

    def __init__(self):
        self.calls = []
        self.counter = 0

    def complete(self, prompts, sampling, adapter=None):
        self.calls.append((len(prompts), sampling, adapter))
        out = []
        for p in prompts:
            if p.rstrip().endswith("Instruction:"):
                first = int(re.findall(r"(\d+)\. Instruction:$", p.rstrip())[0])
                items = []
                for k in range(3):
                    self.counter += 1
                    num = first + k
                    words = " ".join(f"t{self.counter}w{j}" for j in range(4))
                    text = f" Explain {words} clearly"  # distinct: ROUGE-L 0.33 between items
                    items.append(text if k == 0 else f"{num}. Instruction:{text}")
                    items.append(f"{num}. Input: <noinput>")
                out.append(Completion("\n".join(items) + "\n", "stop"))
            else:
                out.append(Completion(f"An answer for prompt {len(p)} with enough words.", "stop"))
        return out

    def chat_prompt(self, user):
        return f"<user>{user}</user><assistant>"

    def close(self):
        pass


def seeds_dir(tmp_path: Path, monkeypatch, names=("alpha", "beta")) -> Path:
    """A seeds root with one written domain per name, made the shipped root for the test."""
    root = tmp_path / "seeds"
    for name in names:
        write_domain(root, name)
    monkeypatch.setenv("SELFSPEC_SEEDS_DIR", str(root))
    return root


@pytest.fixture
def fake_base(tmp_path) -> Path:
    """A base model folder for code that only resolves it (resolve_base_model needs config.json)."""
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture
def fake_generator():
    return FakeGenerator()

