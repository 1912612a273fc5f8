"""The multi-seed studies of `examples/study.py`: one module per paper (its arms,
budgets, measurements and comparisons), and the machinery they share (`base`: what a
study is made of; `running`: training the missing runs; `results`: the results file;
`table`: the table and the model card's block; `deepmoe_arms`: the arms DeepMoE's
trade-off studies share)."""

import importlib

PAPERS = ("deepmoe", "deepmoe_ladder", "deepmoe_frontier", "deepmoe_long", "two_domain",
          "eigen", "shazeer", "routing")


def get_study(paper):
    """The `Study` of `paper` (one of `PAPERS`)."""
    if paper not in PAPERS:
        raise ValueError(f"unknown paper {paper!r}; one of {', '.join(PAPERS)}")
    return importlib.import_module(f"studies.{paper}").study()
