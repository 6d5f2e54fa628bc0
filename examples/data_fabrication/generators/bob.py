"""Bob: counting characters in words and sorting word lists."""

import argparse
import json
import random

WORDS = [
    "apple",
    "banana",
    "cherry",
    "delta",
    "ember",
    "fjord",
    "grape",
    "harbor",
    "island",
    "jungle",
    "kernel",
    "lemon",
    "mango",
    "nectar",
    "orbit",
    "pepper",
    "quartz",
    "river",
    "saddle",
    "timber",
    "umbra",
    "violet",
    "walnut",
    "xenon",
    "yonder",
    "zephyr",
]


def count_char(rng):
    word = rng.choice(WORDS) + rng.choice(WORDS)
    letter = rng.choice(word)
    prompt = f'How many times does "{letter}" occur in "{word}"?'
    return {"task": "count_char", "prompt": prompt, "response": str(word.count(letter))}


def sort_words(rng):
    words = rng.sample(WORDS, rng.randint(3, 7))
    prompt = "Sort alphabetically: " + " ".join(words)
    return {"task": "sort_words", "prompt": prompt, "response": " ".join(sorted(words))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for _ in range(args.count):
        maker = count_char if rng.random() < 0.5 else sort_words
        print(json.dumps(maker(rng)))


if __name__ == "__main__":
    main()
