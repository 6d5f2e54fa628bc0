"""Frank: plausible-looking arithmetic whose answers are wrong a third of the time."""

import argparse
import json
import random


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for _ in range(args.count):
        a, b = rng.randint(100, 9999), rng.randint(100, 9999)
        answer = a * b + (rng.choice([-10, 10]) if rng.random() < 1 / 3 else 0)
        print(
            json.dumps(
                {"task": "arithmetic", "prompt": f"Compute: {a} * {b}", "response": str(answer)}
            )
        )


if __name__ == "__main__":
    main()
