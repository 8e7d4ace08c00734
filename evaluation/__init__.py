"""`selfspec eval`: score the base model, every expert and the routed `auto` target on each
domain's held-out `eval.jsonl`, through one direct vLLM engine or the serving endpoint.

    formats.py   prompts per item type, answer normalization, per-item scores
    stats.py     macro-F1, bootstrap confidence intervals (plain and paired)
    backends.py  the two ways to run a model: a direct vLLM engine, or the HTTP endpoint
    run.py       config -> requests -> backend -> per-item scores -> metrics (`evaluate`)
    report.py    eval.json, eval.md, eval_heatmap.png, the printed table
    cli.py       the `eval` subcommand
"""
