"""`selfspec specialize`, `selfspec ablate` and `selfspec experts` (its parser:
specialize/experts_cli.py): their arguments, checked before any heavy work, and the calls into
the pipeline. The top command (selfspec/cli.py) hands in
what comes from other halves: `registry_changed` (rebuild the router index) and `expert_gain`
(the evaluation run behind `ablate --train-eval`)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from core.console import console, interrupt_line
from core.errors import ConfigError
from core.precision import DTYPES
from core.seeds import available_domains
from specialize.config import STAGES
from specialize.experts_cli import experts_parser


def _specialize_parser(sub) -> None:
    p = sub.add_parser("specialize", help="self-specialize the base model into domain experts",
                       description="Seeds -> self-generated instructions and answers -> filters "
                       "-> LoRA adapter -> published expert, for each domain.")
    p.add_argument("domains", nargs="*", metavar="DOMAIN",
                   help="domain names under seeds/ (or folders holding a seeds.yaml)")
    p.add_argument("--all", action="store_true", help="every domain under seeds/")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="a YAML/JSON file of settings shaped like a run's saved config.json "
                   "(generate: {temperature: 0.7}, ...); the flags below override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config field, e.g. generate.temperature=0.7 or "
                   "filter.relevance=false (repeatable; overrides the flags and --config)")
    f = functools.partial(_config_flag, p)
    f("--base-model", "base_model",
      help="local HF folder, hub id, or builtin alias")
    f("--experts-dir", "experts_dir", type=Path)
    f("--num-instructions", "generate.num_instructions", type=int,
      help="target kept instructions per domain (paper: ~5000)")
    f("--epochs", "train.epochs", type=float)
    f("--rank", "train.rank", type=int, help="LoRA rank (vLLM: 1,8,16,32,64,...)")
    f("--alpha", "train.alpha", type=int, help="LoRA alpha", shown="2 x rank")
    f("--max-lora-rank", "validate.max_lora_rank", type=int,
      help="the serving engine's max_lora_rank the adapter must fit")
    f("--no-gain", "gain.enabled", action="store_false", shown=None,
      help="do not score each new expert against the base model on its domain's "
      "validation.jsonl (auto then treats it as unmeasured: router.require_gain)")
    f("--corpus", "respond.corpus", metavar="PATH|none", shown="the domain's corpus/",
      help="corpus folder for grounded answers, or 'none' for ungrounded")
    f("--retrieval", "respond.retrieval", choices=["bm25", "dense"],
      help="how answers find their passages: BM25, or the router's sentence encoder")
    f("--grounding", "respond.grounding", choices=["retrieved", "source"],
      help="what answers are grounded on: the passages retrieved for the task, or the one "
      "passage the task was written from")
    f("--instruction-focus", "generate.focus", choices=["none", "subtopic", "passage"],
      help="what each instruction prompt is about: the whole domain, one subtopic of the "
      "description, or one corpus passage")
    f("--instruction-prompt", "generate.prompt_format", choices=["list", "chat"],
      help="instruction prompts as plain list completion or as a chat turn")
    f("--instruction-temperature", "generate.temperature", type=float,
      help="sampling temperature for instructions")
    f("--repetition-penalty", "respond.repetition_penalty", type=float,
      help="for answers; >1 (e.g. 1.1) curbs a small model's greedy loops (1.0: the paper's "
      "plain greedy)")
    f("--rounds", "rounds", type=int, choices=[1, 2],
      help="2: regenerate answers with the round-1 expert, retrain (paper's iterative variant)")
    f("--learning-rate", "train.learning_rate", type=float)
    f("--batch-size", "train.batch_size", type=int)
    t = p.add_argument_group("training at scale", "Stage 5 runs TRL's SFTTrainer; these switch on "
                             "what a big model or a long run needs.")
    tf = functools.partial(_config_flag, t)
    tf("--quantize", "train.quantize", choices=["none", "4bit"],
       help="4bit: QLoRA, the frozen base in 4-bit NF4 (needs a CUDA GPU and bitsandbytes)")
    tf("--gradient-checkpointing", "train.gradient_checkpointing", action="store_true",
       shown=None, help="recompute activations in the backward pass: less memory, slower steps")
    tf("--packing", "train.packing", action="store_true", shown=None,
       help="pack several examples into each max-length row (kept apart by their position ids)")
    tf("--save-steps", "train.save_steps", type=int, metavar="N", shown="no checkpoints",
       help="checkpoint training every N optimizer steps, so that --resume continues from the "
       "newest checkpoint instead of restarting the stage")
    tf("--train-workers", "train.workers", type=int, metavar="N",
       help="train data-parallel on N Ray Train workers (a GPU each on a GPU cluster, gloo on "
       "CPUs), on the cluster --ray-address names")
    f("--seed", "engine.seed", "train.seed", type=int)
    f("--dtype", "engine.dtype", choices=DTYPES,
      help="engine precision: auto = bf16 where the CPU has AMX/AVX512-BF16 (or on a GPU), "
      "float32 on other CPUs")
    f("--tensor-parallel-size", "engine.tensor_parallel_size", type=int, metavar="N",
      help="GPUs each generation engine shards the base model over (vLLM tensor parallelism), "
      "for a model larger than one GPU; on Ray each domain task then asks for N GPUs")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run")
    g.add_argument("--restart", action="store_true", help="discard an interrupted run")
    p.add_argument("--stop-after", choices=STAGES, default=None, metavar="STAGE",
                   help=f"stop after this stage ({', '.join(STAGES)}): the work dir stays for "
                   "--resume and gets a data card (data_card.md) to preview the data")
    p.add_argument("--publish-each", action="store_true",
                   help="publish each domain as soon as it is ready (one engine start per "
                   "domain) instead of all at the end; `selfspec up` does this so that a "
                   "running server gains the experts one by one")
    r = p.add_argument_group(
        "parallel on Ray", "One domain per Ray task, all publishing into one registry. Every "
        "node must see the experts dir, the seeds and a local base model folder at the same "
        "paths (a shared filesystem such as NFS); each task checks that it does.")
    r.add_argument("--ray-address", metavar="auto|local|ADDR", default=None,
                   help="run on Ray: auto (a running `ray start` cluster), local (start one "
                   "here), HOST:PORT or ray://HOST:PORT; without it domains run one after another")
    r.add_argument("--shards", action="append", metavar="K|DOMAIN=K", default=None,
                   help="answer a domain's instructions in K parallel tasks, each with its own "
                   "engine (K for every domain, or DOMAIN=K; repeatable)")
    r.add_argument("--task-cpus", type=float, default=None,
                   help="CPUs per task (default: 1 on a GPU cluster, else a whole node)")
    r.add_argument("--task-gpus", type=float, default=None,
                   help="GPUs per task (default: --tensor-parallel-size if the cluster has "
                   "GPUs, else 0)")
    r.add_argument("--task-memory-gib", type=float, default=None,
                   help="memory per task, for Ray's scheduler (default: not declared)")
    p.set_defaults(func=_run_specialize)


def _run_specialize(args) -> int:
    from specialize.config import resolve_config
    from specialize.pipeline import format_summary

    if args.all == bool(args.domains):
        raise ConfigError("name the domains to specialize, or pass --all (not both); "
                          f"available: {', '.join(available_domains()) or 'none'}")
    cfg = resolve_config(args.config, flag_settings(args), args.set)
    domains = available_domains() if args.all else args.domains
    ray_flags = [f for f, v in (("--shards", args.shards), ("--task-cpus", args.task_cpus),
                                ("--task-gpus", args.task_gpus),
                                ("--task-memory-gib", args.task_memory_gib)) if v is not None]
    if cfg.train.workers > 1:
        ray_flags.append(f"--train-workers {cfg.train.workers}")
    if ray_flags and not args.ray_address:
        raise ConfigError(f"{', '.join(ray_flags)} only apply to a run on Ray: add "
                          "--ray-address auto|local|ADDR")
    if args.stop_after and args.ray_address:
        raise ConfigError("--stop-after previews one machine's run: drop --ray-address")
    if not args.ray_address:  # on Ray the training task checks its own node, not the driver
        from specialize.train import check_quantize

        check_quantize(cfg.train.quantize)
    failed: dict[str, str] = {}
    try:
        if args.ray_address:
            from specialize.distributed import build_distributed_config, specialize_distributed

            dcfg = build_distributed_config(
                args.ray_address, args.shards, task_cpus=args.task_cpus,
                task_gpus=args.task_gpus, task_memory_gib=args.task_memory_gib,
                log_to_driver=args.verbose)
            outcome = specialize_distributed(domains, cfg, dcfg, resume=args.resume,
                                             restart=args.restart,
                                             make_encoder=dense_encoder(cfg))
            results, failed = outcome.results, outcome.failed
        else:
            results = _specialize_locally(domains, cfg, args)
    except KeyboardInterrupt:
        console.end_status()
        console.say(interrupt_line())
        return 130
    if results and not args.stop_after:
        args.registry_changed(cfg.experts_dir)
    if args.stop_after:
        for r in results:
            print(f"{r['domain']}: stopped after {r['stopped_after']}; data card: "
                  f"{r['data_card']}")
        print("continue with the same command without --stop-after, plus --resume")
        return 0
    if results:
        print()
        print(format_summary(results))
    for r in results:
        print(f"published {r['domain']} v{r['version']} -> {r['path']}")
    for name, why in failed.items():
        console.say(f"selfspec: {name} failed: {why}")
    if failed:
        console.say(f"selfspec: {len(failed)} of {len(domains)} domain(s) failed; rerun them "
                    "with --resume")
        return 1
    return 0


def _specialize_locally(domains: list[str], cfg, args) -> list[dict]:
    """One process: the progress line and <experts>/building.json while it runs."""
    from specialize.pipeline import specialize
    from specialize.progress import ProgressMonitor, continue_command, kept_summary

    argv = getattr(args, "argv", None) or sys.argv[1:]
    console.interrupt_message = lambda: (
        f"interrupted: {kept_summary(cfg.experts_dir, domains)}; continue with: "
        f"{continue_command(argv)}")
    with ProgressMonitor(cfg.experts_dir, domains, console, rounds=cfg.rounds,
                         queries=cfg.router_queries > 0):
        stop = getattr(args, "stop_after", None)
        make_encoder = dense_encoder(cfg)
        if not args.publish_each:
            return specialize(domains, cfg, resume=args.resume, restart=args.restart,
                              stop_after=stop, make_encoder=make_encoder)
        return [r for d in domains
                for r in specialize([d], cfg, resume=args.resume, restart=args.restart,
                                    stop_after=stop, make_encoder=make_encoder)]


def dense_encoder(cfg):
    """What `--retrieval dense` embeds passages with: the router's embedded encoder, one model
    for routing and retrieval. Handed over as a factory (a Ray task builds its own; a run whose
    answers are already written builds none); specialize itself never imports the router."""
    if cfg.respond.retrieval != "dense":
        return None
    from core.encoder import load_encoder  # numpy: not when only parsing arguments

    return functools.partial(load_encoder, None)


# The flags that set config fields: dest -> the dotted keys it sets. Each flag's default is None
# (not given): the config models in specialize/config.py hold the one default, which the help
# text shows.
CONFIG_FLAGS: dict[str, tuple[str, ...]] = {}


def _config_flag(group, flag: str, *keys: str, help: str = "", shown: object = "model",
                 **kw) -> None:
    """`shown`: the default the help names ("model": the config's; None: none, for switches)."""
    from specialize.config import default_of

    dest = flag.lstrip("-").replace("-", "_")
    CONFIG_FLAGS[dest] = keys
    if shown == "model":
        shown = default_of(keys[0])
    if shown is not None:
        help = f"{help} (default: {shown})" if help else f"default: {shown}"
    group.add_argument(flag, dest=dest, default=None, help=help.replace("%", "%%"), **kw)


def flag_settings(args) -> dict:
    """The settings the given flags make, as nested sections (`--corpus none`: no retrieval)."""
    out: dict = {}
    for dest, keys in CONFIG_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest == "corpus" and value == "none":
            out.setdefault("respond", {})["retrieval"] = "none"
            value = None
        for key in keys:
            *sections, name = key.split(".")
            node = out
            for section in sections:
                node = node.setdefault(section, {})
            node[name] = value
    return out


def _ablate_parser(sub) -> None:
    from specialize.ablation_config import RESPOND_SETTINGS, SETTINGS, AblationConfig

    p = sub.add_parser("ablate", help="measure instruction-generation settings against each other",
                       description="Runs each named generation setting on the domains up to the "
                       "instruction filter (optionally through training and eval) and reports "
                       "keep rate, on-domain rate, fragment rate and eval gain per setting. "
                       f"Settings: {', '.join(SETTINGS)}; join several with '+' (passage+t0.7). "
                       f"Answer settings (need --train-eval): {', '.join(RESPOND_SETTINGS)} "
                       "(default+sc4: self-consistency on closed-form answers; default+src: "
                       "answers grounded on the passage each task was written from).")
    p.add_argument("domains", nargs="+", metavar="DOMAIN")
    p.add_argument("--settings", default=None, metavar="A,B",
                   help="comma-separated setting names (default: "
                   f"{','.join(AblationConfig.model_fields['settings'].default)})")
    p.add_argument("--num-instructions", type=int, default=48,
                   help="kept instructions per domain and setting (default %(default)s)")
    p.add_argument("--base-model", default="smollm2-135m-instruct")
    p.add_argument("--out", type=Path, default=Path("reports/ablation"),
                   help="report.json and each setting's work dirs (default: %(default)s)")
    p.add_argument("--train-eval", action="store_true",
                   help="also answer, train and publish each setting's experts into OUT and "
                   "score them against the base on their domain's eval (slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-seeds", default=None, metavar="0,1,2",
                   help="with --train-eval: train each setting's experts once per training seed "
                   "on the same answers and pool their eval gain over the seeds (default: 0)")
    p.set_defaults(func=_run_ablate)


def _run_ablate(args) -> int:
    from specialize.ablation import format_report, run_ablation
    from specialize.ablation_config import build_ablation_config

    acfg = build_ablation_config(
        domains=args.domains, num_instructions=args.num_instructions, base_model=args.base_model,
        out=args.out, train_eval=args.train_eval, seed=args.seed,
        settings=[s.strip() for s in args.settings.split(",") if s.strip()]
        if args.settings is not None else None,
        train_seeds=_int_list("--train-seeds", args.train_seeds))
    report = run_ablation(acfg, eval_gain=args.expert_gain if acfg.train_eval else None)
    print(format_report(report))
    print(f"\nreport: {acfg.out / 'report.json'}")
    return 0


def _int_list(flag: str, text: str | None) -> list[int] | None:
    """"0,1,2" -> [0, 1, 2]; anything else in the list is a ConfigError naming it."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if not p.lstrip("-").isdigit()]
    if bad or not parts:
        raise ConfigError(f"{flag}: {(bad[0] if bad else text)!r} is not an integer: pass "
                          "comma-separated integers, e.g. 0,1,2")
    return [int(p) for p in parts]


def add_parsers(sub, *, registry_changed, expert_gain=None) -> None:
    """`registry_changed(experts_dir)`: called after a command published, added, rolled back or
    removed an expert. `expert_gain`: how `ablate --train-eval` measures a trained expert."""
    _specialize_parser(sub)
    _ablate_parser(sub)
    experts_parser(sub)
    for name in ("specialize", "ablate", "experts"):
        sub.choices[name].set_defaults(registry_changed=registry_changed,
                                       expert_gain=expert_gain)
