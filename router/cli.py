"""`selfspec route`. Parsing only imports the standard library: torch,
sentence-transformers and FAISS load inside the run functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from router.types import RouterError

STDIN_BATCH = 64  # lines routed per encoder call when stdin is a pipe


def add_parsers(sub) -> None:
    p = sub.add_parser("route", help="route queries to an expert (or the base model)",
                       description="Print the expert each query goes to, with per-expert "
                       "scores; or evaluate routing on labelled queries (--eval).")
    p.add_argument("text", nargs="*", help="the query (words are joined); none: read stdin, "
                   "one query per line")
    p.add_argument("--json", action="store_true",
                   help='one JSON object per query: {"expert", "score", "scores", ...}')
    p.add_argument("--eval", nargs="+", type=Path, metavar="FILE.jsonl",
                   help='labelled queries ({"query", "domain", "style"?}; domain "none" for no '
                   "expert): print accuracy, per-expert precision/recall, per style when the "
                   "queries carry one (seeds/routing_user_dev.jsonl, _test.jsonl), write plots "
                   "to --out")
    p.add_argument("--experts-dir", type=Path, default=Path("experts"))
    p.add_argument("--encoder", default=None, help="sentence-transformers folder or cached id "
                   "(default: the encoder the index was built with, else all-MiniLM-L6-v2)")
    p.add_argument("--rebuild-index", action="store_true",
                   help="re-embed every exemplar (needed after changing --encoder)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="where --eval writes")
    p.set_defaults(func=run_route)


def _load(args):
    from router.index import load_router, pending_build

    reason = pending_build(args.experts_dir, args.encoder, args.rebuild_index)
    if reason:
        print(f"building the router index in {args.experts_dir / 'router'} ({reason}) ...",
              file=sys.stderr)
    return load_router(args.experts_dir, encoder=args.encoder, rebuild=args.rebuild_index)


def run_route(args) -> int:
    if args.eval:
        if args.text:
            raise RouterError("give either a query or --eval FILE, not both")
        return _run_eval(args)
    if args.text:
        text = " ".join(args.text)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RouterError("the query is not valid UTF-8: check the terminal's encoding, "
                              "or pipe it through stdin") from None
        router = _load(args)
        _print(router.route(text), router, args.json, verbose=True)
        return 0
    if sys.stdin.isatty() and not args.json:
        raise RouterError('give a query (selfspec route "text"), or pipe queries one per line: '
                          "selfspec route --json < queries.txt")
    router = _load(args)
    return _route_stream(router, sys.stdin.buffer, args.json)


def _route_stream(router, stream, as_json: bool) -> int:
    """One output line per input line, in order; undecodable lines get an error, not a guess."""
    bad = 0
    batch: list[tuple[int, str | None, str | None]] = []  # (line number, text, error)

    def flush():
        texts = [t for _, t, err in batch if err is None]
        choices = iter(router.route_batch(texts)) if texts else iter(())
        for n, _, err in batch:
            if err is not None:
                obj = {"expert": None, "score": 0.0, "scores": {}, "error": err}
                print(json.dumps(obj) if as_json else f"line {n}: error: {err}")
            else:
                _print(next(choices), router, as_json, verbose=False)
        sys.stdout.flush()
        batch.clear()

    for n, raw in enumerate(stream, 1):
        try:
            text = raw.rstrip(b"\r\n").decode("utf-8")
            batch.append((n, text, None))
        except UnicodeDecodeError as e:
            bad += 1
            msg = f"line {n} is not valid UTF-8 (byte {e.start}): not routed"
            print(f"selfspec: {msg}", file=sys.stderr)
            batch.append((n, None, msg))
        if len(batch) >= STDIN_BATCH or stream.isatty():
            flush()
    flush()
    return 1 if bad else 0


def _print(choice, router, as_json: bool, verbose: bool) -> None:
    if as_json:
        print(json.dumps(choice.to_json(), ensure_ascii=False))
        return
    target = choice.expert or "none (base model)"
    if not verbose:
        ranked = sorted(choice.scores_by_expert.items(), key=lambda kv: -kv[1])
        print(f"{target}\t{choice.score:.3f}\t" + " ".join(f"{n}={s:.3f}" for n, s in ranked))
        return
    print(f"expert: {target}")
    print(f"why:    {choice.reason}")
    if choice.scores_by_expert:
        print("scores:")
        thr = dict(zip(router.names, router.thresholds))
        for name, s in sorted(choice.scores_by_expert.items(), key=lambda kv: -kv[1]):
            mark = "  <- chosen" if name == choice.expert else ""
            print(f"  {name:16s} {s:6.3f}  (threshold {thr[name]:.3f}){mark}")
        if choice.offtopic_score is not None:
            print(f"  {'off-topic text':16s} {choice.offtopic_score:6.3f}  (generic text that "
                  "no expert covers: router/offtopic.py)")


def _run_eval(args) -> int:
    import numpy as np

    from router.evaluate import evaluate, format_report, sweep
    from router.plots import confusion_png, sweep_png
    from router.seedset import load_routing

    for f in args.eval:
        if not f.is_file():
            raise RouterError(f"evaluation file {f} not found")
    items = load_routing(args.eval)
    if not items:
        raise RouterError(f"no queries in {', '.join(map(str, args.eval))}")
    router = _load(args)
    choices = router.route_batch([it.query for it in items])
    scores = np.array([[c.scores_by_expert[n] for n in router.names] for c in choices])
    offtopic = None if any(c.offtopic_score is None for c in choices) else \
        np.array([c.offtopic_score for c in choices])
    ev = evaluate(router.names, router.thresholds, scores, [it.domain for it in items],
                  [it.style for it in items], offtopic, router.cfg)
    rows = sweep(ev, router.names, router.thresholds)
    args.out.mkdir(parents=True, exist_ok=True)
    cm = confusion_png(ev.metrics, args.out / "route_confusion.png")
    sw = sweep_png(rows, args.out / "route_threshold_sweep.png")
    report = {"files": [str(f) for f in args.eval], "router": router.describe(),
              "metrics": ev.metrics, "sweep": rows}
    (args.out / "route_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(ev.metrics))
    else:
        print(f"routed {len(items)} queries from {len(args.eval)} file(s): {router.describe()}\n")
        print(format_report(ev.metrics))
        print(f"\nwrote {cm}, {sw}, {args.out / 'route_eval.json'}")
    return 0
