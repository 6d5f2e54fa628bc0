"""Erin: written independently of Alice, for the same two task families (so the prompts share
their templates with hers): products minus a term, and reversing dictionary words."""

import argparse
import json
import random

VOCABULARY = ["anchor", "breeze", "canyon", "dynamo", "meadow", "pebble", "quiver", "saddle"]


def product(rng):
    a, b, c = rng.randint(3, 30), rng.randint(3, 30), rng.randint(1, 50)
    return {"task": "arithmetic", "prompt": f"Compute: {a} * {b} - {c}", "response": str(a * b - c)}


def mirror(rng):
    word = rng.choice(VOCABULARY) + rng.choice(VOCABULARY)
    return {"task": "reverse", "prompt": f'Reverse the text: "{word}"', "response": word[::-1]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for _ in range(args.count):
        print(json.dumps(rng.choice([product, mirror])(rng)))


if __name__ == "__main__":
    main()
