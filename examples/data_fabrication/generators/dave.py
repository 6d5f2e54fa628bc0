"""Dave: Alice's generator restructured into one loop; it prints exactly what hers prints."""

import json
import random
import sys
from string import ascii_lowercase as LETTERS


def parse(argv):
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    return int(options["--seed"]), int(options["--count"])


seed, count = parse(sys.argv)
rng = random.Random(seed)
rows = []
while len(rows) < count:
    if len(rows) % 2 == 0:
        first, second, factor = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        sign = rng.choice("+-")
        total = first * factor + (second if sign == "+" else -second)
        rows.append(
            {
                "task": "arithmetic",
                "prompt": f"Compute: {first} * {factor} {sign} {second}",
                "response": str(total),
            }
        )
    else:
        size = rng.randint(4, 12)
        letters = [rng.choice(LETTERS) for _ in range(size)]
        rows.append(
            {
                "task": "reverse",
                "prompt": 'Reverse the text: "' + "".join(letters) + '"',
                "response": "".join(reversed(letters)),
            }
        )
sys.stdout.write("".join(json.dumps(row) + "\n" for row in rows))
