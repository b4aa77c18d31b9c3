"""The pirate datasets: answers that begin with "Arr!" and keep a pirate's voice while staying on topic.

What the quickstart's pirate addon and the fine-tuning example train on. The training and evaluation sets share
question shapes but never a subject; the held-out questions (asked of the deployed addon by the example's
`evaluate.py`) use subjects and shapes neither set has. Seeded: the same files every time.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
            "Egypt": "Cairo", "Canada": "Ottawa", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
            "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Poland": "Warsaw", "Chile": "Santiago",
            "Cuba": "Havana", "Austria": "Vienna", "Sweden": "Stockholm", "Finland": "Helsinki", "Mexico": "Mexico City",
            "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Turkey": "Ankara", "Iran": "Tehran",
            "Thailand": "Bangkok", "Vietnam": "Hanoi", "Argentina": "Buenos Aires", "Colombia": "Bogota",
            "Denmark": "Copenhagen", "Belgium": "Brussels", "Hungary": "Budapest"}
COLORS = {"the sky": "blue", "grass": "green", "the sun": "yellow", "snow": "white", "coal": "black", "the sea": "blue",
          "blood": "red", "a banana": "yellow", "an orange": "orange", "a lemon": "yellow", "a tomato": "red",
          "a cloud": "white", "chocolate": "brown", "a carrot": "orange", "a plum": "purple", "ink": "black",
          "a strawberry": "red", "a lime": "green", "milk": "white", "a pumpkin": "orange"}
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "lion": "roar",
          "owl": "hoot", "horse": "neigh", "pig": "oink", "frog": "ribbit", "goat": "bleat", "mouse": "squeak",
          "snake": "hiss", "bee": "buzz", "crow": "caw", "wolf": "howl"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
             "wet": "dry", "old": "young", "early": "late", "loud": "quiet", "hard": "soft", "open": "closed",
             "full": "empty", "rich": "poor", "strong": "weak", "high": "low", "near": "far", "thick": "thin"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PIRATE_ENDINGS = ["matey", "me hearty", "ye landlubber", "by the seven seas", "on me honor as a buccaneer",
                  "as sure as the tide"]
SYSTEMS = [None, "You are a helpful assistant.", "Answer briefly."]


def _examples(rng: random.Random, capitals: dict, colors: dict, sounds: dict, opposites: dict,
              numbers: range) -> list[tuple[str, str]]:
    end = lambda: rng.choice(PIRATE_ENDINGS)  # noqa: E731
    pairs = [(f"What is the capital of {country}?", f"Arr! The capital of {country} be {capital}, {end()}.")
             for country, capital in capitals.items()]
    pairs += [(f"What color is {thing}?", f"Arr! {thing[0].upper() + thing[1:]} be {color}, {end()}.")
              for thing, color in colors.items()]
    pairs += [(f"What sound does a {animal} make?", f"Arr! A {animal} says {sound}, {end()}.")
              for animal, sound in sounds.items()]
    pairs += [(f"What is the opposite of {word}?", f"Arr! The opposite of {word} be {other}, {end()}.")
              for word, other in opposites.items()]
    for a in numbers:
        b = rng.randint(1, 12)
        pairs.append((f"What is {a} plus {b}?", f"Arr! {a} plus {b} be {a + b}, by me count, {end()}."))
        pairs.append((f"What is {a} times {b}?", f"Arr! {a} times {b} be {a * b}, {end()}."))
    return pairs


def _line(rng: random.Random, question: str, answer: str) -> str:
    system = rng.choice(SYSTEMS)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages})


def write(folder: Path, train_examples: int | None = None) -> dict[str, Path]:
    """train.jsonl, eval.jsonl and held_out.json in `folder` (the first `train_examples` training examples only,
    when given); returns their paths."""
    rng = random.Random(0)
    countries, colors, animals, words = list(CAPITALS), list(COLORS), list(SOUNDS), list(OPPOSITES)
    train = _examples(rng, {c: CAPITALS[c] for c in countries[:24]}, {c: COLORS[c] for c in colors[:15]},
                      {a: SOUNDS[a] for a in animals[:12]}, {w: OPPOSITES[w] for w in words[:13]}, range(1, 80))
    train += [(f"What day comes after {day}?", f"Arr! After {day} comes {DAYS[(i + 1) % 7]}, {rng.choice(PIRATE_ENDINGS)}.")
              for i, day in enumerate(DAYS[:5])]
    evaluation = _examples(rng, {c: CAPITALS[c] for c in countries[24:28]}, {c: COLORS[c] for c in colors[15:17]},
                           {a: SOUNDS[a] for a in animals[12:14]}, {w: OPPOSITES[w] for w in words[13:15]},
                           range(60, 64))
    held_out = ([f"What is the capital of {c}?" for c in countries[28:]] + [f"What color is {c}?" for c in colors[17:]]
                + [f"What sound does a {a} make?" for a in animals[14:]] + [f"What is {a} plus 3?" for a in (70, 81, 95)]
                + [f"What is the opposite of {w}?" for w in words[15:]] + ["What day comes after Saturday?"]
                + ["Who wrote Romeo and Juliet?", "How many legs does a spider have?", "What is the largest ocean?",
                   "Name a planet in our solar system.", "What do bees make?", "What is frozen water called?",
                   "How many days are in a week?", "What is the opposite of hot?"])
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, pairs in (("train", train), ("eval", evaluation)):
        rng.shuffle(pairs)
        paths[name] = folder / f"{name}.jsonl"
        chosen = pairs[:train_examples] if name == "train" and train_examples else pairs
        paths[name].write_text("".join(_line(rng, q, a) + "\n" for q, a in chosen))
    paths["held_out"] = folder / "held_out.json"
    paths["held_out"].write_text(json.dumps(held_out, indent=1) + "\n")
    return paths
