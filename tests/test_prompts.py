from specialize.prompts import (
    Focus,
    Task,
    build_instruction_chat_turn,
    build_instruction_prompt,
    build_response_prompt,
    clean_response,
    parse_instruction_list,
    subtopics,
)


def test_instruction_prompt_numbers_demos_and_opens_next_item():
    p = build_instruction_prompt("law", "Contracts and torts.", [Task("Define consideration."),
                                                                Task("Classify this claim.", "A slipped.")])
    assert "1. Instruction: Define consideration.\n1. Input: <noinput>\n" in p
    assert "2. Input: A slipped.\n" in p
    assert p.endswith("3. Instruction:")
    assert "about law" in p and "Contracts and torts." in p


def test_parse_well_formed_list():
    text = (" What is a tort?\n4. Input: <noinput>\n5. Instruction: Summarize the clause.\n"
            "5. Input: The tenant shall pay rent monthly.\n6. Instruction: Is an oral lease valid?\n"
            "6. Input: none\n")
    tasks = parse_instruction_list(text, 4, truncated=False)
    assert tasks == [Task("What is a tort?"), Task("Summarize the clause.",
                                                   "The tenant shall pay rent monthly."),
                     Task("Is an oral lease valid?")]


def test_parse_drops_truncated_last_item_and_output_lines():
    text = (" Compute 2+2.\n4. Input: <noinput>\n4. Output: 4\n5. Instruction: Explain the "
            "Pythagorean theorem to a child\n5. Input: <noi")
    tasks = parse_instruction_list(text, 4, truncated=True)
    assert tasks == [Task("Compute 2+2.")]


def test_parse_tolerates_bare_numbers_bold_and_restarted_lists():
    text = (" **Name two prime numbers above 50.**\n\n"
            "5) Find the mean of 3, 5 and 10\n"
            "1. Instruction: copied demo\n")
    tasks = parse_instruction_list(text, 4, truncated=False)
    assert [t.instruction for t in tasks] == ["Name two prime numbers above 50.",
                                              "Find the mean of 3, 5 and 10"]


def test_parse_blank_line_ends_a_field():
    tasks = parse_instruction_list(" Define equity.\n\nSome unrelated rambling text", 2, False)
    assert tasks == [Task("Define equity.")]


def test_response_prompt_has_demos_passages_and_open_response():
    p = build_response_prompt("finance", "Money.", [(Task("What is a bond?"), "A loan.")],
                              Task("Define yield.", "Bond at 95."), ["Yield is income/price."])
    assert p.index("### Instruction:\nWhat is a bond?") < p.index("### Background:")
    assert p.index("[1] Yield is income/price.") < p.index("Define yield.")
    assert p.endswith("### Input:\nBond at 95.\n\n### Response:\n")


def test_clean_response_cuts_at_next_example():
    assert clean_response(" A bond is a loan.\n\n### Instruction:\nNext") == "A bond is a loan."


def test_focused_prompts_name_their_subtopic_or_passage():
    demos = [Task("Define consideration.")]
    plain = build_instruction_prompt("law", "Contracts and torts.", demos)
    sub = build_instruction_prompt("law", "Contracts and torts.", demos,
                                   Focus(subtopic="defamation"))
    psg = build_instruction_prompt("law", "Contracts and torts.", demos,
                                   Focus(passage="A contract needs offer and acceptance."))
    assert "6. Cover many subtopics of law." in plain
    assert "6. Every task should be about this subtopic of law: defamation." in sub
    assert "Cover many" not in sub
    assert "law passage (an input may quote it):\nA contract needs offer and acceptance.\n" in psg
    # the passage sits before the list, so the demos and the opened item stay last
    assert psg.index("offer and acceptance") < psg.index("List of tasks:")
    assert all(p.endswith("2. Instruction:") for p in (plain, sub, psg))


def test_chat_turn_asks_for_the_next_item_and_leaves_it_unopened():
    turn = build_instruction_chat_turn("law", "Contracts.", [Task("A?"), Task("B?")],
                                       Focus(subtopic="torts"))
    assert "2. Instruction: B?\n2. Input: <noinput>\n" in turn
    assert turn.endswith("Continue the list with task 3 and the next ones, in the same format.")
    assert "3. Instruction:" not in turn and "about this subtopic of law: torts" in turn


def test_subtopics_split_the_description_list_outside_parentheses():
    desc = ("Medicine at textbook level: anatomy and physiology, pharmacology (drug classes, "
            "mechanisms); genetics, and immunology and vaccines. Tasks include questions.")
    assert subtopics(desc) == ["anatomy and physiology", "pharmacology (drug classes, mechanisms)",
                               "genetics", "immunology and vaccines"]
    assert subtopics("Cooking for beginners. Tasks: a, b.") == ["Cooking for beginners. Tasks: a, b."]


def test_every_shipped_description_lists_subtopics():
    from core.seeds import available_domains, load_domain

    for name in available_domains():
        topics = subtopics(load_domain(name).description)
        assert len(topics) >= 8, (name, topics)
        assert all(2 < len(t) < 120 for t in topics), (name, topics)
