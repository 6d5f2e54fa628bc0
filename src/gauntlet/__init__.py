"""gauntlet: contribution scoring, ratings, weights and the chain interface."""
