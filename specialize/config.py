"""One typed config per pipeline stage, composed into `SpecializeConfig`.

Everything is validated when the config is built (before a model is loaded), and every stage
writes the resolved config it ran with beside its outputs. Defaults are sized so that
`selfspec specialize --all` on the embedded 135M model finishes four domains in well under
30 minutes on 2 CPU cores; the paper's scale is `--num-instructions 5000 --epochs 3`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from core.errors import ConfigError
from core.lora import VLLM_LORA_RANKS
from core.precision import Dtype

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


class EngineConfig(_Config):
    """The shared vLLM engine used by the generation stages."""

    max_model_len: int = Field(2048, ge=256)
    # vLLM CPU: KV cache size comes from VLLM_CPU_KVCACHE_SPACE (GiB); keep it small on 2-core boxes.
    kv_cache_gib: int = Field(2, ge=1)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=0.95)
    # auto: bf16 on GPUs and on CPUs with native bf16 (AMX/AVX512-BF16), fp32 on other CPUs,
    # where bf16 is emulated and ~8x slower (core/precision.py).
    dtype: Dtype = "auto"
    seed: int = 0


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


class ResponseFilterConfig(_Config):
    """Stage 4: drop empty, truncated and degenerate responses."""

    min_chars: int = Field(2, ge=1)
    drop_truncated: bool = True  # an answer cut by max_tokens teaches the expert to stop mid-way
    # A response whose distinct 4-grams are under this share of all its 4-grams is looping.
    min_distinct_ngram_ratio: float = Field(0.5, gt=0, le=1)
    max_line_repeats: int = Field(3, ge=2)


class TrainConfig(_Config):
    """Stage 5: LoRA on all linear layers, loss on the completion only."""

    rank: ServableRank = 8  # Self-MoE r=8; also under vLLM's default max_lora_rank of 16
    alpha: int = Field(16, ge=1)
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
    engine: EngineConfig = EngineConfig()
    generate: GenerateConfig = GenerateConfig()
    filter: FilterConfig = FilterConfig()
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
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(msgs)) from None
