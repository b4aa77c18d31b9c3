"""Write the pirate datasets into data/: train.jsonl, eval.jsonl and held_out.json.

    python examples/fine-tuning/make_dataset.py

The generator ships with Ember (`ember.provider.tools.pirate`), as the quickstart trains its pirate addon on a
part of the same training set.
"""

from pathlib import Path

from ember.provider.tools import pirate

if __name__ == "__main__":
    paths = pirate.write(Path(__file__).resolve().parent / "data")
    counts = {name: len(path.read_text().splitlines()) for name, path in paths.items() if name != "held_out"}
    print(f"{counts['train']} training and {counts['eval']} evaluation examples, and the held-out questions, in "
          f"{paths['train'].parent}")
