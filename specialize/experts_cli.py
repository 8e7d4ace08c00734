"""`selfspec experts`: list, add, roll back, remove and show the experts of a registry (the
changes themselves: specialize/add.py and specialize/manage.py). Every change goes through the registry's
compare-and-swap, so a running server picks it up at its next poll."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.registry import load_registry


def experts_parser(sub) -> None:
    p = sub.add_parser("experts", help="list, add, roll back, remove or show experts",
                       description="Without a subcommand: list the experts in the registry. "
                       "Every change replaces registry.json atomically and bumps its revision, "
                       "so a running server picks it up at its next poll; a refused change "
                       "leaves the registry as it was.")
    p.add_argument("--experts-dir", type=Path, default=Path("experts"))
    p.add_argument("--json", action="store_true", help="print the registry as JSON")
    p.set_defaults(func=_run_experts)
    ops = p.add_subparsers(dest="experts_command", metavar="{add,rollback,remove,show}")
    # SUPPRESS: a subcommand's unset --experts-dir must not overwrite one given before it.
    where = {"type": Path, "default": argparse.SUPPRESS,
             "help": "the registry (default: experts)"}

    a = ops.add_parser("add", help="add an existing PEFT LoRA adapter as an expert",
                       description="Checks the adapter against the registry's base model (its "
                       "recorded base and every LoRA matrix's shape) and vLLM's LoRA rules, "
                       "builds the routing exemplars, and publishes it as a new version "
                       "(v1, or the next version if NAME exists). The adapter folder's files "
                       "are copied; subfolders (checkpoints) are not.")
    a.add_argument("name", metavar="NAME")
    a.add_argument("--adapter", type=Path, required=True, metavar="DIR",
                   help="a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)")
    g = a.add_mutually_exclusive_group()
    g.add_argument("--seeds", type=Path, metavar="FILE",
                   help="a seeds.yaml (seeds/README.md): its instructions route to the expert")
    g.add_argument("--exemplars", type=Path, metavar="FILE",
                   help="example queries, one a line: text, or JSONL of strings or objects "
                   "with a 'query' field (default for a new version: the current ones)")
    a.add_argument("--description", default=None,
                   help="what the expert knows, one sentence (default: the seed file's, or "
                   "the current version's)")
    a.add_argument("--base-model", default=None,
                   help="the base the adapter was trained on (default: the registry's base; "
                   "another one is refused)")
    a.add_argument("--max-lora-rank", type=int, default=None,
                   help="the serving engine's max_lora_rank (default: what a server started "
                   "on this registry uses, at least 16)")
    a.add_argument("--data-card", type=Path, default=None, metavar="FILE",
                   help="a Markdown data card, kept as data_card.md in the version folder")
    a.add_argument("--experts-dir", **where)
    a.set_defaults(func=_run_experts_add)

    r = ops.add_parser("rollback", help="serve an earlier version of an expert again",
                       description="Points the registry at an earlier version folder (they "
                       "are all kept on disk). Without --to: the version before the current "
                       "one. A removed expert is restored with --to.")
    r.add_argument("name", metavar="NAME")
    r.add_argument("--to", default=None, metavar="vN", help="the version to serve, e.g. v1")
    r.add_argument("--experts-dir", **where)
    r.set_defaults(func=_run_experts_rollback)

    d = ops.add_parser("remove", help="take an expert out of the registry (files kept)",
                       description="Removes NAME from the registry; a running server stops "
                       "serving it at its next poll. Its version folders stay on disk in "
                       ".versions/NAME (restore with `rollback NAME --to vN`, delete them "
                       "with rm -r). The last expert is refused without --force: every "
                       "`auto` request would then get the base model.")
    d.add_argument("name", metavar="NAME")
    d.add_argument("--force", action="store_true", help="remove even the last expert")
    d.add_argument("--experts-dir", **where)
    d.set_defaults(func=_run_experts_remove)

    s = ops.add_parser("show", help="an expert's entry, versions, measured gain and data card")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--report", type=Path, default=Path("reports/eval.json"),
                   help="the eval report to take the measured gain from (default: %(default)s)")
    s.add_argument("--experts-dir", **where)
    s.set_defaults(func=_run_experts_show)


def _run_experts_add(args) -> int:
    from specialize.add import add_expert, build_add_config

    cfg = build_add_config(
        name=args.name, adapter=args.adapter, experts_dir=args.experts_dir, seeds=args.seeds,
        exemplars=args.exemplars, description=args.description, base_model=args.base_model,
        max_lora_rank=args.max_lora_rank, data_card=args.data_card)
    change = add_expert(cfg)
    args.registry_changed(args.experts_dir)
    print(f"added {change.name} v{change.after.version} -> "
          f"{args.experts_dir / change.after.path} (registry revision {change.revision})")
    return 0


def _run_experts_rollback(args) -> int:
    from specialize.manage import parse_version, rollback_expert

    to = parse_version(args.to) if args.to else None
    change = rollback_expert(args.experts_dir, args.name, to)
    args.registry_changed(args.experts_dir)
    was = f"v{change.before.version}" if change.before else "removed"
    print(f"{change.name}: {was} -> v{change.after.version} (registry revision "
          f"{change.revision})")
    return 0


def _run_experts_remove(args) -> int:
    from specialize.manage import remove_expert

    change = remove_expert(args.experts_dir, args.name, force=args.force)
    if load_registry(args.experts_dir).experts:
        args.registry_changed(args.experts_dir)
    print(f"removed {change.name} (was v{change.before.version}; registry revision "
          f"{change.revision}); its versions stay in "
          f"{args.experts_dir / '.versions' / change.name}")
    return 0


def _run_experts_show(args) -> int:
    from specialize.manage import describe_expert, format_expert

    report = args.report if args.report.is_file() else None
    print(format_expert(describe_expert(args.experts_dir, args.name, report), args.experts_dir))
    return 0


def _run_experts(args) -> int:
    reg = load_registry(args.experts_dir)
    if args.json:
        print(reg.model_dump_json(indent=2))
        return 0
    if not reg.experts:
        print(f"no experts in {args.experts_dir} (run: selfspec specialize --all)")
        return 0
    rows = [("name", "version", "base model", "examples", "loss", "created")]
    for e in sorted(reg.experts.values(), key=lambda e: e.name):
        t = e.train
        loss = (f"{t.loss_first:.2f}→{t.loss_last:.2f}"
                if t is not None and t.loss_first is not None else "-")
        rows.append((e.name, f"v{e.version}", e.base_model,
                     str(t.examples) if t is not None else "added", loss,
                     e.created.strftime("%Y-%m-%d %H:%M")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"\nregistry revision {reg.revision}: {args.experts_dir / 'registry.json'}")
    return 0
