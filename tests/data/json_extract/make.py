"""Writes the json_extract demo dataset: a person's name, age and city from one English sentence, as one-line JSON.

    python tests/data/json_extract/make.py [OUT_DIR]      (default: this folder)

Prompt:     Extract name, age and city as JSON: Maria is 34 years old and lives in Lisbon.
Completion: {"name": "Maria", "age": 34, "city": "Lisbon"}      (keys in this order; json.dumps separators)

Rows are TRL's conversational prompt-completion form, {"prompt": [user message], "completion": [assistant
message]}, so the trainer renders them with the chat template and the adapter is served with messages.

Deterministic (seeded; stdlib only). 200 rows -> train.jsonl, 40 -> valid.jsonl; no validation row's
(name, city) pair occurs in train. Each sentence template is used equally often on both sides. ASCII only.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 20240611
N_TRAIN, N_VALID = 200, 40
INSTRUCTION = "Extract name, age and city as JSON:"

NAMES = [
    "Maria", "Jonas", "Priya", "Kenji", "Aisha", "Mateo", "Olga", "Chen", "Fatima", "Lars",
    "Amara", "Diego", "Yuki", "Omar", "Ingrid", "Ravi", "Zanele", "Liam", "Sofia", "Ahmed",
    "Mei", "Kwame", "Elena", "Hiroshi", "Leila", "Tomasz", "Nia", "Carlos", "Anya", "Tariq",
    "Freya", "Juan", "Sana", "Pierre", "Ngozi", "Emil", "Lucia", "Arjun", "Hana", "Bjorn",
    "Chloe", "Dmitri", "Ayesha", "Kofi", "Isabel", "Wei", "Nadia", "Pablo", "Astrid", "Jamal",
    "Rosa", "Sipho", "Mikael", "Farah", "Luca", "Keiko", "Tendai", "Oscar", "Zara", "Ivan",
    "Rahul", "Greta", "Minh", "Layla", "Andrei", "Chiara", "Emeka", "Aroha", "Tupac", "Malak",
]

CITIES = [
    "Lisbon", "Oslo", "Mumbai", "Nairobi", "Tokyo", "Lima", "Cairo", "Toronto", "Berlin", "Hanoi",
    "Accra", "Dublin", "Seoul", "Madrid", "Denver", "Lagos", "Perth", "Quito", "Krakow", "Osaka",
    "Chicago", "Santiago", "Manila", "Istanbul", "Vienna", "Jakarta", "Helsinki", "Montreal", "Casablanca",
    "Bogota", "Melbourne", "Prague", "Dakar", "Edinburgh", "Havana", "Marseille", "Tunis", "Auckland",
    "Bangalore", "New York", "Buenos Aires", "Cape Town", "Hong Kong", "Kuala Lumpur", "Mexico City",
]

JOBS = ["baker", "nurse", "teacher", "pilot", "chef", "plumber", "lawyer", "dentist", "tailor", "gardener"]

TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Living in {city}, {age}-year-old {name} works as a {job}.",
    "Age {age}, {name} calls {city} home.",
    "{name}, {age}, is from {city}.",
    "Meet {name} from {city}, who just turned {age}.",
    "In {city}, {name} celebrated {a_ordinal} birthday.",
    "{name} ({age}) moved to {city} last year.",
    "At {age}, {name} still lives in {city}.",
    "{city} resident {name}, aged {age}, is a {job}.",
    "The {age}-year-old {job} {name} lives in {city}.",
]


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def with_article(n: int) -> str:
    """ "an 18th", "an 80th", "a 34th" """
    return ("an " if n == 18 or 80 <= n <= 89 else "a ") + ordinal(n)


def row(rng: random.Random, template: str, name: str, city: str) -> dict:
    age = rng.randint(18, 90)
    sentence = template.format(name=name, city=city, age=age, a_ordinal=with_article(age), job=rng.choice(JOBS))
    completion = json.dumps({"name": name, "age": age, "city": city})
    return {"prompt": [{"role": "user", "content": f"{INSTRUCTION} {sentence}"}],
            "completion": [{"role": "assistant", "content": completion}]}


def make(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    pairs = [(n, c) for n in NAMES for c in CITIES]
    rng.shuffle(pairs)  # distinct (name, city) pairs: train takes the first ones, validation the next
    train_pairs, valid_pairs = pairs[:N_TRAIN], pairs[N_TRAIN:N_TRAIN + N_VALID]
    train = [row(rng, TEMPLATES[i % len(TEMPLATES)], n, c) for i, (n, c) in enumerate(train_pairs)]
    valid = [row(rng, TEMPLATES[i % len(TEMPLATES)], n, c) for i, (n, c) in enumerate(valid_pairs)]
    rng.shuffle(train)
    rng.shuffle(valid)
    return train, valid


def write(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    train, valid = make()
    write(train, out / "train.jsonl")
    write(valid, out / "valid.jsonl")
    print(f"wrote {len(train)} rows to {out / 'train.jsonl'} and {len(valid)} to {out / 'valid.jsonl'}")


if __name__ == "__main__":
    main(sys.argv[1:])
