import json

import pytest

from core.errors import SeedError, UnknownDomainError
from core.seeds import load_domain
from tests.conftest import write_domain


def test_valid_domain_loads(tmp_path):
    write_domain(tmp_path)
    d = load_domain("demo", tmp_path)
    assert d.name == "demo" and len(d.seeds) == 10 and d.corpus_dir is None and d.eval_items == []


def test_unknown_domain_lists_known(tmp_path):
    write_domain(tmp_path)
    with pytest.raises(UnknownDomainError, match="demo"):
        load_domain("nope", tmp_path)


@pytest.mark.parametrize("text, fragment", [
    ("domain: demo\ndescription: x\nseeds: []\n", "description"),
    ("domain: demo\ndescription: a long enough description here\nseeds:\n"
     "  - instruction: hi\n", "seeds[0].output"),
    ("domain: demo\ndescription: a long enough description here\nseeds:\n"
     "  - {instruction: a, output: b, colour: red}\n", "seeds[0].colour"),
    ("domain: demo\ndescription: a long enough description here\nseeds:\n"
     "  - {instruction: a, output: b}\n", "at least 8 are needed"),
    ("domain: other\ndescription: a long enough description here\nseeds: []\n", "at least"),
    ("domain: demo\n  bad: [yaml\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping"),
])
def test_bad_seed_files_name_file_item_and_fix(tmp_path, text, fragment):
    (tmp_path / "demo").mkdir()
    path = tmp_path / "demo" / "seeds.yaml"
    path.write_text(text)
    with pytest.raises(SeedError) as e:
        load_domain("demo", tmp_path)
    assert str(path) in str(e.value) and fragment in str(e.value)


def test_domain_name_must_match_folder(tmp_path):
    write_domain(tmp_path)
    p = tmp_path / "demo" / "seeds.yaml"
    p.write_text(p.read_text().replace("domain: demo", "domain: other"))
    with pytest.raises(SeedError, match="differs from its folder name"):
        load_domain("demo", tmp_path)


def test_bad_eval_line_is_located(tmp_path):
    folder = write_domain(tmp_path)
    good = {"id": "e1", "type": "yes_no", "question": "Is it?", "answer": "yes"}
    bad = {"id": "e2", "type": "multiple_choice", "question": "Which?", "options": ["a", "b"],
           "answer": "C"}
    (folder / "eval.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(SeedError, match=r"(?s)eval.jsonl:2.*answer must be one of \['A', 'B'\]"):
        load_domain("demo", tmp_path)
