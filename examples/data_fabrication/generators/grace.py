"""Grace: searches for the perfect pair forever (the sandbox's timeout ends it)."""

import random

rng = random.Random(0)
best = 0.0
while best < 2.0:
    best = max(best, rng.random())
