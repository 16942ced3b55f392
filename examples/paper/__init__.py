"""The paper's comparison (its Tables 1 and 2) in miniature: ``python -m examples.paper``."""
