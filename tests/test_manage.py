"""`selfspec experts add | rollback | remove | show` on a tiny fake base checkpoint: each command's
effect on the registry and the folders, and every refused change leaving them byte-for-byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import selfspec.cli
from core.errors import AdapterError, ExpertNotFoundError, RegistryError
from core.registry import GainInfo, load_registry, write_registry
from selfspec.cli import main
from specialize.add import _model_name, add_expert, build_add_config, read_exemplars
from specialize.manage import describe_expert, format_expert, remove_expert, rollback_expert
from tests.conftest import write_domain

# (out, in) of each base weight the fake adapters adapt.
SHAPES = {"q_proj": (6, 4), "down_proj": (4, 10)}
MODULES = {"q_proj": "model.layers.0.self_attn.q_proj", "down_proj": "model.layers.0.mlp.down_proj"}


@pytest.fixture
def base(tmp_path) -> Path:
    return tiny_base(tmp_path / "tiny-base")


def tiny_base(d: Path) -> Path:
    """A base checkpoint with just the weights the fake adapters adapt."""
    d.mkdir()
    (d / "config.json").write_text("{}")
    save_file({f"{MODULES[m]}.weight": torch.zeros(*s) for m, s in SHAPES.items()} |
              {"model.embed_tokens.weight": torch.zeros(12, 4)}, str(d / "model.safetensors"))
    return d


def make_adapter(folder: Path, base: Path, rank: int = 8, recorded: str | None = None,
                 in_features: int | None = None, **cfg) -> Path:
    folder.mkdir(parents=True)
    tensors = {}
    for m, (out_f, in_f) in SHAPES.items():
        key = f"base_model.model.{MODULES[m]}"
        tensors[f"{key}.lora_A.weight"] = torch.zeros(rank, in_features or in_f)
        tensors[f"{key}.lora_B.weight"] = torch.zeros(out_f, rank)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": sorted(SHAPES), "base_model_name_or_path":
        recorded if recorded is not None else str(base), "task_type": "CAUSAL_LM", **cfg}))
    (folder / "README.md").write_text("model card")
    (folder / "checkpoint-10").mkdir()  # not part of the adapter: never copied
    return folder


@pytest.fixture
def seeds(tmp_path) -> Path:
    return write_domain(tmp_path / "seeds", "tax") / "seeds.yaml"


@pytest.fixture
def experts(tmp_path, base, seeds) -> Path:
    """A registry with `tax` v1 and v2 (two adapters) and `law` v1."""
    root = tmp_path / "experts"
    for i, name in enumerate(["tax", "tax", "law"]):
        add_expert(build_add_config(
            name=name, adapter=make_adapter(tmp_path / f"a{i}", base), experts_dir=root,
            seeds=seeds if i == 0 else None, base_model=str(base),
            exemplars=None if i < 2 else write_lines(tmp_path / "law.txt", 6),
            description=None if i < 2 else "Law: contracts, torts and the courts explained."))
    return root


def write_lines(path: Path, n: int) -> Path:
    path.write_text("".join(f"legal question number {i}?\n" for i in range(n)))
    return path


@pytest.fixture(autouse=True)
def no_index_build(monkeypatch):
    """The CLI rebuilds the router index after a change; the encoder is not what is tested."""
    calls = []
    monkeypatch.setattr(selfspec.cli, "rebuild_router_index", calls.append)
    return calls


def snapshot(root: Path) -> dict:
    """Every file under the experts dir with its bytes, and every link with its target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"-> {p.readlink()}"
        elif p.is_file() and p.name != ".lock":
            out[rel] = p.read_bytes()
    return out


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["experts", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- add -----------------------------------------------------------------------------------

def test_add_publishes_a_version_with_seed_exemplars(experts, seeds, tmp_path):
    reg = load_registry(experts)
    assert reg.revision == 3 and sorted(reg.experts) == ["law", "tax"]
    tax = reg.experts["tax"]
    assert (tax.version, tax.lora_name, tax.train) == (2, "tax@v2", None)
    assert tax.source == str((tmp_path / "a1").resolve())
    assert tax.lora.model_dump() == {"rank": 8, "alpha": 16,
                                     "target_modules": ["down_proj", "q_proj"]}
    assert tax.exemplars == [f"Explain topic number {i} of the tax field in plain words."
                             for i in range(10)]  # v2 kept v1's, from the seed file
    assert tax.description.startswith("The tax domain")
    assert (experts / "tax").resolve() == (experts / ".versions/tax/v2").resolve()
    v1 = experts / ".versions/tax/v1"
    assert sorted(p.name for p in v1.iterdir()) == ["adapter", "config.json", "data",
                                                    "expert.json"]
    assert sorted(p.name for p in (v1 / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    rows = (v1 / "data/exemplars.jsonl").read_text().splitlines()
    assert json.loads(rows[0]) == {"query": tax.exemplars[0]}
    assert json.loads((v1 / "config.json").read_text())["command"] == "selfspec experts add"
    law = reg.experts["law"]
    assert law.exemplars == [f"legal question number {i}?" for i in range(6)]


def test_add_through_the_cli(experts, base, tmp_path, capsys, no_index_build):
    card = tmp_path / "card.md"
    card.write_text("# Data card\nsynthetic, 96 examples\n")
    code, out, _ = cli(capsys, "add", "math", "--adapter", make_adapter(tmp_path / "m", base),
                       "--exemplars", write_lines(tmp_path / "m.txt", 5), "--description",
                       "Math: algebra, arithmetic and word problems.", "--data-card", card,
                       "--experts-dir", experts)
    assert code == 0 and out.startswith("added math v1 -> ") and "revision 4" in out
    assert no_index_build == [experts]
    assert (experts / ".versions/math/v1/data_card.md").read_text() == card.read_text()


@pytest.mark.parametrize("name, lines, expected", [
    ("q.txt", ["how do I file?", "", "  what is VAT?  ", "how do I file?"],
     ["how do I file?", "what is VAT?"]),
    ("q.jsonl", ['"plain string"', '{"query": "a query"}', '{"instruction": "an instruction"}'],
     ["plain string", "a query", "an instruction"]),
])
def test_exemplar_files(tmp_path, name, lines, expected):
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    assert read_exemplars(tmp_path / name) == expected


@pytest.mark.parametrize("recorded, name", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
    ("/root/.cache/selfspec/models/smollm2-135m-instruct/", "smollm2-135m-instruct"),
    ("/hf/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/0a1b", "smollm2-135m-instruct"),
])
def test_base_model_names_compare_across_machines(recorded, name):
    assert _model_name(recorded) == name


def test_a_hub_id_of_the_same_model_is_accepted(tmp_path, base, seeds):
    # The adapter was trained on the hub copy; the registry's base is a local folder of that name.
    local = base.rename(tmp_path / "SmolLM2-135M-Instruct")
    adapter = make_adapter(tmp_path / "a", local, recorded="HuggingFaceTB/SmolLM2-135M-Instruct")
    change = add_expert(build_add_config(name="tax", adapter=adapter, seeds=seeds,
                                         experts_dir=tmp_path / "e", base_model=str(local)))
    assert change.after.version == 1 and change.before is None


# --- refused changes: one line, exit 2, nothing written ------------------------------------

def bad_adapter(kind: str, tmp_path: Path, base: Path) -> Path:
    folder = tmp_path / f"bad-{kind}"
    if kind == "other-base":
        return make_adapter(folder, base, recorded="HuggingFaceTB/SmolLM2-360M-Instruct")
    if kind == "shapes":
        return make_adapter(folder, base, in_features=5)
    if kind == "rank-32":
        return make_adapter(folder, base, rank=32)
    if kind == "rank-12":
        return make_adapter(folder, base, rank=12)
    if kind == "dora":
        return make_adapter(folder, base, use_dora=True)
    folder.mkdir()
    return folder  # "empty": not a PEFT folder


@pytest.mark.parametrize("kind, message", [
    ("other-base", "was trained on 'HuggingFaceTB/SmolLM2-360M-Instruct' but the registry's "
                   "base model is"),
    ("shapes", "takes 5 inputs where the base's model.layers.0.mlp.down_proj takes 10"),
    ("rank-32", "rank 32 > max_lora_rank 16: pass --max-lora-rank 32"),
    ("rank-12", "rank 12 is not one of vLLM's"),
    ("dora", "DoRA"),
    ("empty", "no adapter_config.json"),
])
def test_bad_adapter_is_refused_and_nothing_changes(experts, base, tmp_path, capsys, kind,
                                                     message):
    before = snapshot(experts)
    code, out, err = cli(capsys, "add", "tax", "--adapter", bad_adapter(kind, tmp_path, base),
                         "--experts-dir", experts)
    assert code == 2 and not out
    assert err.startswith("selfspec: error: ") and message in err, err
    assert snapshot(experts) == before


def test_rank_32_fits_an_engine_started_with_32(experts, base, tmp_path):
    change = add_expert(build_add_config(name="tax", adapter=bad_adapter("rank-32", tmp_path, base),
                                         experts_dir=experts, max_lora_rank=32))
    assert change.after.lora.rank == 32


@pytest.mark.parametrize("args, message", [
    (["add", "newbie", "--adapter", "{ok}"], "'newbie' is a new expert: pass --seeds"),
    (["add", "newbie", "--adapter", "{ok}", "--exemplars", "{few}"],
     "2 distinct queries; the router needs at least 5"),
    (["add", "newbie", "--adapter", "{ok}", "--exemplars", "{many}"], "pass --description"),
    (["add", "tax", "--adapter", "{ok}", "--base-model", "{other}"],
     "an expert on '{other}' would not be served"),
    (["add", "auto", "--adapter", "{ok}"], "invalid expert name 'auto'"),
    (["add", "tax", "--adapter", "{ok}", "--description", "short"], "at least 20 characters"),
    (["add", "tax", "--adapter", "{ok}", "--data-card", "{missing}"], "is not a file"),
    (["rollback", "nobody"], "no expert named 'nobody' in the registry (experts: law, tax)"),
    (["rollback", "tax", "--to", "v9"], "tax has no version v9 (versions on disk: v1, v2)"),
    (["rollback", "tax", "--to", "x2"], "write it as vN"),
    (["rollback", "tax", "--to", "v2"], "tax is already at v2"),
    (["rollback", "law"], "law v1 has no earlier version to roll back to"),
    (["remove", "nobody"], "no expert named 'nobody'"),
    (["show", "nobody"], "no expert named 'nobody'"),
])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(experts, base, tmp_path, capsys,
                                                          args, message):
    other = tmp_path / "other-base"
    other.mkdir()
    (other / "config.json").write_text("{}")
    paths = {"ok": make_adapter(tmp_path / "ok", base), "few": write_lines(tmp_path / "f", 2),
             "many": write_lines(tmp_path / "m", 7), "other": other,
             "missing": tmp_path / "no-card.md"}
    args = [a.format(**paths) for a in args]
    message = message.format(**paths)
    before = snapshot(experts)
    code, out, err = cli(capsys, *args, "--experts-dir", experts)
    assert code == 2 and not out
    assert err.count("\n") == 1 and message in err, err
    assert snapshot(experts) == before


# --- rollback and remove -------------------------------------------------------------------

def test_rollback_goes_to_the_previous_version_and_keeps_the_folders(experts, capsys):
    code, out, _ = cli(capsys, "rollback", "tax", "--experts-dir", experts)
    assert code == 0 and out.strip() == "tax: v2 -> v1 (registry revision 4)"
    reg = load_registry(experts)
    assert reg.revision == 4 and reg.experts["tax"].lora_name == "tax@v1"
    assert reg.experts["tax"].model_dump(mode="json") == json.loads(
        (experts / ".versions/tax/v1/expert.json").read_text())
    assert (experts / "tax").resolve() == (experts / ".versions/tax/v1").resolve()
    assert (experts / ".versions/tax/v2/adapter/adapter_model.safetensors").is_file()
    change = rollback_expert(experts, "tax", 2)  # and forward again
    assert (change.before.version, change.after.version, change.revision) == (1, 2, 5)


def test_a_new_version_after_a_rollback_never_reuses_a_number(experts, base, tmp_path):
    rollback_expert(experts, "tax")
    change = add_expert(build_add_config(name="tax", adapter=make_adapter(tmp_path / "n", base),
                                         experts_dir=experts))
    assert (change.before.version, change.after.version) == (1, 3)


def test_remove_keeps_the_files_and_rollback_restores(experts, capsys):
    code, out, _ = cli(capsys, "remove", "tax", "--experts-dir", experts)
    assert code == 0 and "removed tax (was v2; registry revision 4)" in out
    reg = load_registry(experts)
    assert sorted(reg.experts) == ["law"] and reg.revision == 4
    assert not (experts / "tax").exists()
    assert sorted(p.name for p in (experts / ".versions/tax").iterdir()) == ["v1", "v2"]
    with pytest.raises(ExpertNotFoundError, match="restore it with --to vN"):
        rollback_expert(experts, "tax")
    assert "not in the registry (removed)" in format_expert(describe_expert(experts, "tax"),
                                                            experts)
    change = rollback_expert(experts, "tax", 1)
    assert change.before is None and load_registry(experts).experts["tax"].version == 1


def test_removing_the_last_expert_needs_force(experts, capsys):
    remove_expert(experts, "tax")
    before = snapshot(experts)
    with pytest.raises(RegistryError, match="last expert: without it every `auto` request"):
        remove_expert(experts, "law")
    assert snapshot(experts) == before
    code, _, _ = cli(capsys, "remove", "law", "--force", "--experts-dir", experts)
    assert code == 0 and load_registry(experts).experts == {}


# --- show ----------------------------------------------------------------------------------

def test_show_prints_the_entry_versions_and_no_data_card(experts, capsys):
    code, out, _ = cli(capsys, "show", "tax", "--experts-dir", experts, "--report",
                       experts / "none.json")
    assert code == 0
    assert out.splitlines()[0] == "tax v2  (tax@v2 in the engine)"
    assert "rank 8, alpha 16, down_proj, q_proj" in out
    assert "training      outside selfspec; added from" in out
    assert "exemplars     10 routing queries" in out
    assert "measured gain not measured" in out
    assert "eval gain     none in an eval report" in out
    assert "v1 " in out and "v2 (current)" in out
    assert out.rstrip().endswith("no data card")


def test_show_prints_the_data_card_and_the_measured_gain(experts, tmp_path, capsys):
    (experts / ".versions/tax/v2/data_card.md").write_text("# tax data card\n96 examples\n")
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({
        "created": "2026-12-01T10:00:00+00:00",
        "registry": {"experts_dir": str(experts.resolve()),
                     "experts": {"tax": {"version": 2, "lora_name": "tax@v2"},
                                 "law": {"version": 7, "lora_name": "law@v7"}}},
        "comparisons": {"expert_vs_base": {
            "tax": {"domain": "tax", "diff": 0.125, "ci": [0.05, 0.2], "p_not_better": 0.01},
            "law": {"domain": "law", "diff": 0.1, "ci": [0.0, 0.2], "p_not_better": 0.1}}}}))
    code, out, _ = cli(capsys, "show", "tax", "--report", report, "--experts-dir", experts)
    assert code == 0
    assert "eval gain     +0.125 score over base on tax (95% CI +0.050 to +0.200" in out
    assert out.rstrip().endswith("# tax data card\n96 examples")
    code, out, _ = cli(capsys, "show", "law", "--report", report, "--experts-dir", experts)
    assert f"not measured for v1 ({report} measured v7)" in out


def test_list_shows_added_experts(experts, capsys):
    code, out, _ = cli(capsys, "--experts-dir", experts)
    assert code == 0
    assert [line.split()[:4] for line in out.splitlines()[1:3]] == [
        ["law", "v1", str(Path(experts).parent / "tiny-base"), "added"],
        ["tax", "v2", str(Path(experts).parent / "tiny-base"), "added"]]


def test_adapter_error_names_the_base(experts, base, tmp_path):
    with pytest.raises(AdapterError, match="tiny-base"):
        add_expert(build_add_config(name="tax", experts_dir=experts,
                                    adapter=bad_adapter("shapes", tmp_path, base)))


def test_show_prints_the_gain_measured_at_training(experts, capsys):
    reg = load_registry(experts)
    reg.experts["tax"].gain = GainInfo(metric="validation_score", expert=0.6, base=0.5,
                                       diff=0.1, ci=[0.02, 0.18], p_not_better=0.01, n=40)
    write_registry(experts, reg)
    code, out, _ = cli(capsys, "show", "tax", "--experts-dir", experts)
    assert code == 0
    assert "measured gain +0.100 vs base on validation (95% CI +0.020..+0.180, p 0.01, n 40)" \
        in out
