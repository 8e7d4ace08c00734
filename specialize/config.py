"""One typed config per pipeline stage, composed into `SpecializeConfig`.

Everything is validated when the config is built (before a model is loaded), and every stage
writes the resolved config it ran with beside its outputs. Defaults are sized so that
`selfspec specialize --all` on the embedded 135M model finishes four domains in well under
30 minutes on 2 CPU cores; the paper's scale is `--num-instructions 5000 --epochs 3`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from core.engine import EngineConfig
from core.errors import ConfigError
from core.lora import VLLM_LORA_RANKS


def _servable(rank: int) -> int:
    if rank not in VLLM_LORA_RANKS:
        raise ValueError(f"rank {rank} is not one vLLM can serve; use one of "
                         f"{list(VLLM_LORA_RANKS)}")
    return rank


ServableRank = Annotated[int, AfterValidator(_servable)]


# The stages `selfspec specialize --stop-after` can stop after, in run order.
STAGES = ("generate", "filter", "respond", "filter_responses", "train")


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GenerateConfig(_Config):
    """Stage 1: the base model writes new instructions, few-shot from sampled seeds."""

    num_instructions: int = Field(96, ge=1, description="target number of KEPT instructions")
    seeds_per_prompt: int = Field(3, ge=1, le=8)  # Self-MoE: 3 seeds in context
    generated_per_prompt: int = Field(0, ge=0, le=4)  # Self-Instruct also mixed in 2 generated
    # Self-MoE: 1.0. At 0.7 (Self-Instruct's) the 135M model's candidates are on-domain 86% vs
    # 74% and fragments 29% vs 36%, and 39% vs 30% pass the filters (docs/quality.md).
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.98, gt=0, le=1)  # Self-MoE: 0.98
    # What each prompt asks its tasks to be about: "none" (the whole domain, as Self-MoE's
    # prompt), "subtopic" (one subtopic listed in the description), "passage" (one passage of the
    # domain's corpus/; a domain without a corpus falls back to subtopics). At temperature 0.7 a
    # passage cut the 135M model's fragments from 29% to 18% of candidates, on-domain unchanged
    # (85% vs 86%), keep rate 44% vs 39%, for ~30% more generation time (docs/quality.md).
    focus: Literal["none", "subtopic", "passage"] = "passage"
    focus_words: int = Field(120, ge=20, le=400, description="a focus passage's length cap")
    # "list": plain completion of the numbered list (the paper's base-model prompt); "chat": the
    # same request as a user turn in the model's chat template, the reply opened at the next item.
    prompt_format: Literal["list", "chat"] = "list"
    max_tokens: int = Field(384, ge=32)
    # Constrain each completion to the numbered-list format (vLLM structured outputs), at most
    # this many new items; 0 turns the constraint off and relies on parsing alone.
    guided_items: int = Field(4, ge=0, le=20)
    prompts_per_batch: int = Field(16, ge=1)
    # Stop when this many batches in a row add nothing new (a model stuck on duplicates).
    patience: int = Field(4, ge=1)
    max_batches: int = Field(200, ge=1)


class FilterConfig(_Config):
    """Stage 2: drop near-duplicates, bad lengths, non-text tasks and eval contamination."""

    rouge_threshold: float = Field(0.7, gt=0, le=1)  # Self-Instruct: ROUGE-L F1 > 0.7 is a dup
    min_words: int = Field(4, ge=1)  # Self-Instruct drops <= 3 words
    max_words: int = Field(150, ge=4)
    contamination_ngram: int = Field(8, ge=3)
    blacklist: tuple[str, ...] = (
        "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map",
        "maps", "draw", "plot", "go to", "video", "audio", "flowchart", "diagram", "photo",
        "chart", "spreadsheet", "website", "url", "link", "screenshot",
    )
    # What a small model gets wrong (issue 16; specialize/quality.py). Both need the router's
    # embedded encoder; a tiny random test model writes noise they rightly reject.
    wellformed: bool = True  # a question or imperative, not a fragment; the input fits the task
    # Cosine between an input's and its instruction's embeddings: 0.05 is below all but one of
    # the 114 shipped seeds with an input (0.013); "Identify and create group note to sell way."
    # with its unrelated input scores 0.12, so this catches only inputs with nothing in common.
    min_input_similarity: float = Field(0.05, ge=-1, lt=1)
    relevance: bool = True  # closer to its own domain than to every other and to everyday tasks
    # own score - best rival score must be at least this (0: nearest wins). At 0, 95-99% of each
    # domain's seeds pass leave-one-out and 1-4% of the everyday routing_none queries do.
    relevance_margin: float = Field(0.0, ge=-1, le=1)
    relevance_top_k: int = Field(3, ge=1, le=20)  # a set's score: mean cosine to its k nearest
    # Reject when the base model's perplexity of the task exceeds this multiple of the seeds'
    # median perplexity (None: off). Needs the run's vLLM engine (prompt logprobs).
    max_perplexity_ratio: float | None = Field(4.0, gt=1)


QueryStyle = Literal["story", "lay", "keywords", "exam", "task"]


class QueriesConfig(_Config):
    """Stage 2b (issue 17): the base model writes routing queries the ways users ask, from the
    seeds rewritten into each style and one corpus passage per prompt; filtered like
    instructions. Kept ones become router exemplars (`SpecializeConfig.router_queries`)."""

    candidates: int = Field(40, ge=1, description="queries the base model writes per domain, "
                            "spread evenly over the styles")
    styles: tuple[QueryStyle, ...] = ("story", "lay", "keywords", "exam", "task")
    demos_per_prompt: int = Field(3, ge=1, le=8)  # seeds rewritten into the prompt's style
    items_per_prompt: int = Field(4, ge=1, le=10)  # queries one completion may write
    temperature: float = Field(0.7, ge=0)  # stage 1's measured choice (docs/quality.md)
    top_p: float = Field(0.98, gt=0, le=1)
    focus_words: int = Field(120, ge=20, le=400, description="a focus passage's length cap")
    rouge_threshold: float = Field(0.7, gt=0, le=1)  # as the instruction filter's
    relevance_margin: float = Field(0.0, ge=-1, le=1)  # own domain - best rival, as the filter's
    relevance_top_k: int = Field(3, ge=1, le=20)


def _a_vote(k: int) -> int:
    if k == 1:
        raise ValueError("1 sample is no majority: use 0 (off) or at least 2 samples (e.g. 4)")
    return k


class RespondConfig(_Config):
    """Stage 3: the base model answers each kept instruction (greedy, 5 seed demos)."""

    demos: int = Field(5, ge=0, le=10)  # Self-Specialization: 5 seed demonstrations
    # Consecutive instructions that share one draw of demonstrations, so that their prompts share
    # the persona + demos prefix and vLLM's prefix cache prefills it once (on CPU, prefill of
    # ~1,000-token prompts is most of the stage). 1: every instruction draws its own demos.
    shared_demos: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0)  # the paper decodes answers greedily
    # >1 discourages the greedy repetition loops that small models fall into (on the 135M model
    # ~20-45% of answers loop and are dropped); 1.0 is the paper's plain greedy decoding.
    repetition_penalty: float = Field(1.0, ge=1.0, le=2.0)
    max_tokens: int = Field(320, ge=16)
    batch_size: int = Field(32, ge=1)
    retrieval: Literal["none", "bm25", "dense"] = "bm25"
    top_k: int = Field(2, ge=1, le=10)
    passage_words: int = Field(160, ge=20, description="passages are cut to this many words")
    corpus: Path | None = None  # None: the domain's own corpus/ folder if it has one
    # What an answer is grounded on: the top_k passages retrieved for the task ("retrieved", the
    # paper's knowledge-infused variant), or the one passage stage 1 wrote the task from
    # ("source"; a task without one, e.g. written from a subtopic, falls back to retrieval).
    grounding: Literal["retrieved", "source"] = "retrieved"
    # Self-consistency (specialize/consistency.py): answers sampled per closed-form task (yes/no,
    # multiple choice, classification); stage 4 keeps the answer only when most samples give
    # its label. 0: off until a measured run says it helps.
    self_consistency: Annotated[int, Field(ge=0), AfterValidator(_a_vote)] = 0
    # The samples need a temperature (greedy would repeat the answer k times); 0.7 is what
    # Huang et al. (2022) sampled their reasoning paths at.
    consistency_temperature: float = Field(0.7, gt=0)


class ResponseFilterConfig(_Config):
    """Stage 4: drop empty, truncated, degenerate and (optionally) echoing responses."""

    min_chars: int = Field(2, ge=1)
    drop_truncated: bool = True  # an answer cut by max_tokens teaches the expert to stop mid-way
    # A response whose distinct 4-grams are under this share of all its 4-grams is looping.
    min_distinct_ngram_ratio: float = Field(0.5, gt=0, le=1)
    max_line_repeats: int = Field(3, ge=2)
    # "echo": an answer whose content words come mostly from its own instruction and input
    # restates the task instead of answering it; the expert would learn to parrot. The share
    # of the answer's content words (see filter_responses.echo_share) found in the task at or
    # above which it is dropped; None: off until a measured run says it helps.
    max_echo_share: float | None = Field(None, gt=0, le=1)
    # Answers with fewer content words are never "echo": a closed-form answer ("Yes.",
    # "Answer: B", "x = 13") legitimately repeats the task's words or has none of its own.
    echo_min_words: int = Field(5, ge=1)


class TrainConfig(_Config):
    """Stage 5: LoRA on all linear layers, loss on the completion only."""

    rank: ServableRank = 8  # Self-MoE r=8; also under vLLM's default max_lora_rank of 16
    # None: 2 x rank (filled in when the config is built), so a larger rank keeps the same
    # alpha/rank scale unless alpha is given.
    alpha: int | None = Field(None, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    learning_rate: float = Field(3e-4, gt=0)  # Self-MoE
    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(8, ge=1, description="examples per optimizer step")
    # Examples per forward pass: the logits of a 49K vocabulary over 4 x 512 tokens already take
    # ~0.8 GB in fp32; larger batches are accumulated from micro-batches.
    micro_batch_size: int = Field(4, ge=1)
    max_seq_len: int = Field(512, ge=32)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None: all cores")
    # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, CUDA only), the adapter in bf16.
    quantize: Literal["none", "4bit"] = "none"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower
    packing: bool = False  # several examples per max_seq_len row, kept apart by position ids
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N optimizer steps "
                                   "into the stage's checkpoints/ for --resume; None: none")
    # Data-parallel ranks through Ray Train's TorchTrainer (gloo on CPU, NCCL on GPUs), each
    # training its share of every batch (batch_size stays the examples per optimizer step).
    workers: int = Field(1, ge=1, le=1024)

    @model_validator(mode="before")
    @classmethod
    def _alpha_follows_rank(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("alpha") is None:
            rank = data.get("rank", cls.model_fields["rank"].default)
            if isinstance(rank, int):  # a bad rank gets its own error, not one about alpha
                data = {**data, "alpha": 2 * rank}
        return data


class ValidateConfig(_Config):
    """Stage 6: reject adapters that the serving engine would refuse."""

    max_lora_rank: ServableRank = 16  # vLLM's default max_lora_rank


class GainConfig(_Config):
    """Stage 5b: the new expert against the base model on the domain's validation split
    (seeds/<domain>/validation.jsonl), in the training process; stored in the registry entry
    for `router.require_gain`. A domain without the file publishes with no gain."""

    enabled: bool = True
    max_items: int | None = Field(None, ge=1, description="None: every validation item")
    resamples: int = Field(1000, ge=100)


class SpecializeConfig(_Config):
    base_model: str = "smollm2-135m-instruct"
    experts_dir: Path = Path("experts")
    rounds: int = Field(1, ge=1, le=2)
    # How many kept generated instructions the router gets as exemplars (besides every seed).
    router_exemplars: int = Field(32, ge=0)
    # How many kept generated user-style queries (stage 2b, specialize/queries.py) the router
    # also gets; 0 turns the stage off. Off: on the user-style dev split they moved no in-domain
    # query to its expert and pulled one or two off-topic ones onto an expert (docs/router.md,
    # "What each indexed source gives").
    router_queries: int = Field(0, ge=0)
    engine: EngineConfig = EngineConfig()
    generate: GenerateConfig = GenerateConfig()
    filter: FilterConfig = FilterConfig()
    queries: QueriesConfig = QueriesConfig()
    respond: RespondConfig = RespondConfig()
    responses: ResponseFilterConfig = ResponseFilterConfig()
    train: TrainConfig = TrainConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    gain: GainConfig = GainConfig()

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @model_validator(mode="after")
    def _cross(self) -> SpecializeConfig:
        if self.train.rank > self.validate_.max_lora_rank:
            raise ValueError(
                f"rank {self.train.rank} > max_lora_rank {self.validate_.max_lora_rank}: pass "
                f"--max-lora-rank {self.train.rank} (and serve with it) or retrain with "
                f"--rank <= {self.validate_.max_lora_rank}")
        return self


def build_config(**kwargs) -> SpecializeConfig:
    """Build and validate; pydantic errors become one readable ConfigError."""
    from pydantic import ValidationError

    try:
        return SpecializeConfig.model_validate(kwargs)
    except ValidationError as e:
        msgs = [f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid configuration: " + "; ".join(msgs)) from None


# ---- a run's config from its sources -------------------------------------------------------
# Lowest first: the models' defaults < a --config file < the explicit flags < each --set. Each
# source gives only what it sets; a section given in part keeps the rest of its fields.

def resolve_config(file: Path | None = None, flags: dict | None = None,
                   settings: list[str] = ()) -> SpecializeConfig:
    """The validated config of a run; a bad file, key or value is one ConfigError naming it."""
    data = load_config_file(file) if file is not None else {}
    data = merge_settings(data, flags or {})
    for item in settings:
        key, value = parse_setting(item)
        for part in reversed(key.split(".")):
            value = {part: value}
        data = merge_settings(data, value)
    return build_config(**data)


def load_config_file(path: Path) -> dict:
    """A YAML (or JSON) mapping of settings, shaped like the config.json a run saves."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not YAML or JSON ({str(e).splitlines()[0]})") \
            from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings (base_model: ..., "
                          f"generate: {{temperature: 0.7}}, ...), not a {type(data).__name__}")
    return data


def parse_setting(item: str) -> tuple[str, Any]:
    """`generate.temperature=0.7` -> ("generate.temperature", 0.7); the value is read as YAML
    (numbers, true/false, null, [lists]); the key must name a config field."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. generate.temperature=0.7")
    check_key(key)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw  # a plain string that happens to look like broken YAML
    return key, value


def check_key(key: str) -> None:
    """A dotted key must name a field (`generate.temperature`) or a section (`train`)."""
    model: type[BaseModel] = SpecializeConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.alias or name: f for name, f in model.model_fields.items()}
        where = ".".join(parts[:i]) or "the config"
        if part not in fields:
            raise ConfigError(f"--set {key}: {where} has no setting {part!r}; it has "
                              f"{', '.join(sorted(fields))}")
        sub = fields[part].annotation
        if i < len(parts) - 1 and not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is a value, not a section")
        model = sub


def merge_settings(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section (`validate_` is read as `validate`)."""
    out = {_ALIASES.get(k, k): v for k, v in base.items()}
    for k, v in over.items():
        k = _ALIASES.get(k, k)
        out[k] = merge_settings(out[k], v) if isinstance(v, dict) and \
            isinstance(out.get(k), dict) else v
    return out


_ALIASES = {"validate_": "validate"}


def default_of(key: str) -> Any:
    """A field's default, for help texts (`default_of("train.rank")` -> 8)."""
    value: Any = SpecializeConfig()
    for part in key.split("."):
        value = getattr(value, "validate_" if part == "validate" else part)
    return value
