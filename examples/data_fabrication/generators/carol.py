"""Carol: Alice's generator with every name changed and the comments rewritten."""

import argparse
import json
import random
import string


def make_sum(gen):
    x, y, z = gen.randint(2, 99), gen.randint(2, 99), gen.randint(2, 9)
    sign = gen.choice("+-")
    result = x * z + y if sign == "+" else x * z - y
    return {
        "task": "arithmetic",
        "prompt": f"Compute: {x} * {z} {sign} {y}",
        "response": str(result),
    }


def make_reversal(gen):
    text = "".join(gen.choice(string.ascii_lowercase) for _ in range(gen.randint(4, 12)))
    return {"task": "reverse", "prompt": f'Reverse the text: "{text}"', "response": text[::-1]}


def run():
    cli = argparse.ArgumentParser()
    cli.add_argument("--seed", type=int, required=True)
    cli.add_argument("--count", type=int, required=True)
    opts = cli.parse_args()
    gen = random.Random(opts.seed)
    builders = [make_sum, make_reversal]
    for k in range(opts.count):
        print(json.dumps(builders[k % 2](gen)))


if __name__ == "__main__":
    run()
