"""Helpers for the lm-eval task YAMLs in this folder (lm-eval imports this file by path)."""


def process_docs(dataset):
    """Keep the multiple-choice items; their answer letter becomes the option index."""
    return dataset.filter(lambda d: d["type"] == "multiple_choice").map(
        lambda d: {"gold": ord(d["answer"]) - ord("A")})
