"""Alice: arithmetic with a product and a sum, and reversing random words."""

import argparse
import json
import random
import string


def arithmetic(rng):
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
    op = rng.choice("+-")
    value = a * c + b if op == "+" else a * c - b
    return {"task": "arithmetic", "prompt": f"Compute: {a} * {c} {op} {b}", "response": str(value)}


def reverse(rng):
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 12)))
    return {"task": "reverse", "prompt": f'Reverse the text: "{word}"', "response": word[::-1]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    makers = [arithmetic, reverse]
    for i in range(args.count):
        print(json.dumps(makers[i % 2](rng)))


if __name__ == "__main__":
    main()
