"""Ivan: prints pairs, but in his own format: a tab-separated line, or the wrong keys."""

import argparse
import json
import random


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for i in range(args.count):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        if i % 4 == 0:
            print(
                json.dumps(
                    {"task": "arithmetic", "prompt": f"Compute: {a} + {b}", "response": str(a + b)}
                )
            )
        elif i % 4 == 1:
            print(f"Compute: {a} + {b}\t{a + b}")
        else:
            print(json.dumps({"question": f"{a} + {b}", "answer": a + b}))


if __name__ == "__main__":
    main()
