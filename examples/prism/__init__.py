"""PRISM-style architecture search over the library's GPT family (REFERENCE §4).

Miners submit signed GPT configs; the validator runs a four-tier funnel (static validation,
proxy score, short prequential training run, held-out benchmark) with near-duplicate
rejection, ranks the survivors, sets weights and writes the winner's config for
``sparseloco simulate``. Run ``python -m examples.prism --help`` from the repository root.
"""
