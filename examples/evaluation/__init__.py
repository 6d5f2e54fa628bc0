"""SWE-Forge-style evaluation (REFERENCE §4): tasks mined from a git history, agents scored by
the tests a real change made pass.

Each commit that fixes code and adds a test becomes a task: the parent is the base, the code
diff is the hidden reference patch, the test diff is the test patch; running the tests before
and after the change (for real) gives fail_to_pass and pass_to_pass. Tasks are drawn from the
newest ones by a public seed, and renewed as commits arrive. Run
``python -m examples.evaluation --help`` from the repository root.
"""
