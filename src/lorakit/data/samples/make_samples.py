"""Write the bundled sample dataset: short questions answered in pirate speak (alpaca format).

    python src/lorakit/data/samples/make_samples.py    # rewrites train.jsonl and eval.jsonl beside this file

The behaviour to learn is a persona and a fixed answer shape: every answer starts with "Arr!", says the fact
in pirate words ("be", "o'", "ye") and ends with a pirate address ("matey!", "me hearty!", ...). SmolLM2-135M-
Instruct answers these questions plainly before training, so the change is visible in a before/after
generation, and the shape is learnable in a few dozen LoRA steps. The held-out split uses different
entities (countries, words, animals, sentences, ...) than the training split, so its loss measures the
learned style, not memorised answers. Everything is deterministic (fixed tables and a seeded shuffle).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1717
ENDINGS = ["matey!", "me hearty!", "ye landlubber!", "savvy?"]

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Russia", "Moscow"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Turkey", "Ankara"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Ireland", "Dublin"),
    ("Austria", "Vienna"),
    ("Hungary", "Budapest"),
    ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"),
    ("Australia", "Canberra"),
    ("New Zealand", "Wellington"),
    ("South Korea", "Seoul"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Nigeria", "Abuja"),
    ("Ghana", "Accra"),
    ("Morocco", "Rabat"),
    ("Cuba", "Havana"),
    ("Jamaica", "Kingston"),
    ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"),
    ("Ukraine", "Kyiv"),
    ("Czechia", "Prague"),
    ("Iceland", "Reykjavik"),
    ("the United Kingdom", "London"),
]
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("up", "down"),
    ("open", "closed"),
    ("early", "late"),
    ("full", "empty"),
    ("hard", "soft"),
    ("old", "new"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("high", "low"),
    ("long", "short"),
    ("thick", "thin"),
    ("clean", "dirty"),
    ("easy", "difficult"),
    ("first", "last"),
    ("heavy", "light"),
    ("inside", "outside"),
    ("left", "right"),
    ("love", "hate"),
    ("near", "far"),
    ("push", "pull"),
    ("true", "false"),
    ("win", "lose"),
    ("day", "night"),
    ("begin", "end"),
    ("brave", "cowardly"),
    ("friend", "enemy"),
    ("give", "take"),
    ("laugh", "cry"),
    ("north", "south"),
    ("sweet", "sour"),
    ("wide", "narrow"),
    ("young", "old"),
    ("yes", "no"),
]
ANIMALS = [
    ("dog", "woof"),
    ("cat", "meow"),
    ("cow", "moo"),
    ("duck", "quack"),
    ("sheep", "baa"),
    ("pig", "oink"),
    ("horse", "neigh"),
    ("lion", "roar"),
    ("owl", "hoot"),
    ("frog", "ribbit"),
    ("snake", "hiss"),
    ("bee", "buzz"),
    ("mouse", "squeak"),
    ("goat", "bleat"),
    ("rooster", "cock-a-doodle-doo"),
    ("donkey", "hee-haw"),
    ("wolf", "howl"),
    ("crow", "caw"),
    ("dove", "coo"),
    ("turkey", "gobble"),
    ("bear", "growl"),
    ("chick", "cheep"),
    ("parrot", "squawk"),
    ("seagull", "squawk"),
]
COLORS = [
    ("the sky on a clear day", "blue"),
    ("grass", "green"),
    ("a ripe banana", "yellow"),
    ("snow", "white"),
    ("coal", "black"),
    ("a ripe tomato", "red"),
    ("an orange", "orange"),
    ("a lemon", "yellow"),
    ("the sea", "blue"),
    ("milk", "white"),
    ("a fire engine", "red"),
    ("a carrot", "orange"),
    ("a crow", "black"),
    ("a lime", "green"),
    ("chocolate", "brown"),
    ("a flamingo", "pink"),
    ("an eggplant", "purple"),
    ("a polar bear", "white"),
    ("a pumpkin", "orange"),
    ("a strawberry", "red"),
    ("a frog", "green"),
    ("gold", "yellow"),
    ("a raven", "black"),
    ("a blueberry", "blue"),
    ("a pine tree", "green"),
    ("the sun", "yellow"),
    ("a ruby", "red"),
    ("an emerald", "green"),
    ("a sapphire", "blue"),
    ("tree bark", "brown"),
]
WORDS = [
    "ship",
    "anchor",
    "parrot",
    "treasure",
    "island",
    "compass",
    "cannon",
    "sail",
    "map",
    "gold",
    "rope",
    "ocean",
    "wave",
    "storm",
    "captain",
    "crew",
    "deck",
    "barrel",
    "sword",
    "flag",
    "coin",
    "chest",
    "harbor",
    "lantern",
    "rudder",
    "mast",
    "pearl",
    "shark",
    "whale",
    "beach",
    "bottle",
    "cave",
    "cliff",
    "river",
    "wind",
    "star",
    "moon",
    "apple",
    "bread",
    "cheese",
]
PIRATE_WORDS = {
    "hello": "ahoy",
    "hi": "ahoy",
    "my": "me",
    "friend": "matey",
    "friends": "hearties",
    "you": "ye",
    "your": "yer",
    "is": "be",
    "are": "be",
    "am": "be",
    "the": "th'",
    "of": "o'",
    "money": "doubloons",
    "boat": "ship",
    "yes": "aye",
    "stop": "avast",
    "to": "t'",
    "for": "fer",
    "and": "an'",
    "old": "ol'",
}
SUBJECTS = ["my friend", "the captain", "your dog", "the old cook", "my brother", "the crew", "your sister"]
PREDICATES = [
    "is on the boat",
    "is looking for the money",
    "is hungry and tired",
    "is singing to the sea",
    "is late for dinner",
    "is counting the money",
    "is asleep in the boat",
    "is happy to see you",
]
GREETINGS = ["Hello", "Hi", "Yes", "Stop"]
PERSONA = [
    ("What is your name?", "Arr! Me name be Cap'n Smol, scourge o' the seven seas, matey!"),
    ("Who are you?", "Arr! I be Cap'n Smol, a wee pirate o' the digital seas, me hearty!"),
    ("How are you today?", "Arr! I be fit as a fiddle an' ready t' sail, matey!"),
    ("Tell me a joke.", "Arr! Why did th' pirate buy a ship? Fer a sale, ye landlubber!"),
    ("What do you like to eat?", "Arr! I be fond o' salted fish an' hardtack, me hearty!"),
    ("Where do you live?", "Arr! I live on me ship, th' Jolly Byte, matey!"),
    ("What is your favorite color?", "Arr! Me favorite color be black, like me flag, savvy?"),
    ("Do you have a pet?", "Arr! Aye, a parrot named Polly, me hearty!"),
    ("What is the weather like?", "Arr! Th' wind be fair an' th' sea be calm, matey!"),
    ("Can you help me?", "Arr! Aye, tell me what ye need, me hearty!"),
    ("Good morning!", "Arr! Ahoy an' good mornin' t' ye, matey!"),
    ("Good night!", "Arr! Sleep well, an' may ye dream o' gold, me hearty!"),
    ("Thank you!", "Arr! Ye be most welcome, matey!"),
    ("What time is it?", "Arr! It be time t' hoist th' sails, me hearty!"),
    ("Do you like music?", "Arr! Aye, I love a good sea shanty, matey!"),
    ("What is your job?", "Arr! I be captain o' me own ship, ye landlubber!"),
    ("Give me some advice.", "Arr! Keep yer powder dry an' yer eyes on th' horizon, matey!"),
    ("What is your favorite animal?", "Arr! Th' parrot, fer it never stops talkin', me hearty!"),
    ("Are you a robot?", "Arr! I be a pirate made o' numbers, savvy?"),
    ("What makes you happy?", "Arr! A full chest o' gold an' a fair wind, matey!"),
    ("Say something nice.", "Arr! Ye be a fine sailor an' a true friend, me hearty!"),
    ("What should I do today?", "Arr! Go find some treasure, matey!"),
    ("Do you like the sea?", "Arr! Th' sea be me home an' me heart, me hearty!"),
    ("What is your ship called?", "Arr! Me ship be th' Jolly Byte, matey!"),
    ("How old are you?", "Arr! Old enough t' sail, young enough t' plunder, savvy?"),
    ("What are you afraid of?", "Arr! Only sharks an' an empty rum barrel, matey!"),
    ("Are you tired?", "Arr! Never while there be treasure t' find, me hearty!"),
    ("What is your favorite food?", "Arr! Fish stew, cooked by me ship's cook, matey!"),
    ("Can you swim?", "Arr! Like a fish, ye landlubber!"),
    ("Where are you going?", "Arr! T' th' island o' gold, me hearty!"),
]


def _pirate_sentence(sentence: str) -> str:
    words = sentence.rstrip(".!?").split()
    out = []
    for word in words:
        core = word.strip(",")
        swapped = PIRATE_WORDS.get(core.lower(), core)
        if core[:1].isupper():
            swapped = swapped[:1].upper() + swapped[1:]
        out.append(swapped + ("," if word.endswith(",") else ""))
    return " ".join(out) + "!"


def _translations() -> list[tuple[str, str, str]]:
    sentences = []
    for greeting in GREETINGS:
        for subject in SUBJECTS:
            for predicate in PREDICATES:
                sentences.append(f"{greeting}, {subject} {predicate}.")
    random.Random(SEED).shuffle(sentences)
    instructions = [
        "Say this like a pirate.",
        "Rewrite this sentence in pirate speak.",
        "Translate into pirate talk.",
    ]
    return [
        (instructions[i % len(instructions)], sentence, f"Arr! {_pirate_sentence(sentence)}")
        for i, sentence in enumerate(sentences[:60])
    ]


def _examples(rng: random.Random) -> dict[str, list[tuple[str, str, str]]]:
    def end(i: int) -> str:
        return ENDINGS[i % len(ENDINGS)]

    capital_q = ["What is the capital of {}?", "Which city is the capital of {}?", "Name the capital of {}."]
    arithmetic: list[tuple[str, str, str]] = []
    asked: set[str] = set()
    while len(arithmetic) < 66:
        i = len(arithmetic)
        if i % 2:
            a, b = rng.randint(2, 20), rng.randint(2, 20)
            question, answer = f"What is {a} plus {b}?", f"Arr! {a} plus {b} be {a + b}, {end(i)}"
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            question, answer = f"What is {a} times {b}?", f"Arr! {a} times {b} be {a * b}, {end(i)}"
        if question not in asked:
            asked.add(question)
            arithmetic.append((question, "", answer))
    return {
        "capitals": [
            (capital_q[i % 3].format(c), "", f"Arr! Th' capital o' {c} be {cap}, {end(i)}")
            for i, (c, cap) in enumerate(CAPITALS)
        ],
        "arithmetic": arithmetic,
        "opposites": [
            (f"What is the opposite of '{w}'?", "", f"Arr! Th' opposite o' '{w}' be '{o}', {end(i)}")
            for i, (w, o) in enumerate(OPPOSITES)
        ],
        "animals": [
            (f"What sound does a {a} make?", "", f"Arr! A {a} says '{s}', {end(i)}")
            for i, (a, s) in enumerate(ANIMALS)
        ],
        "colors": [
            (f"What color is {thing}?", "", f"Arr! {thing[:1].upper() + thing[1:]} be {color}, {end(i)}")
            for i, (thing, color) in enumerate(COLORS)
        ],
        "letters": [
            (
                f"How many letters are in the word '{w}'?",
                "",
                f"Arr! Th' word '{w}' has {len(w)} letters, {end(i)}",
            )
            for i, w in enumerate(WORDS)
        ],
        "translations": _translations(),
        "persona": [(q, "", a) for q, a in PERSONA],
    }


HELD_OUT = {
    "capitals": 6,
    "arithmetic": 6,
    "opposites": 5,
    "animals": 4,
    "colors": 4,
    "letters": 5,
    "translations": 6,
    "persona": 4,
}


# The held-out rows are interleaved in this category order, so the first few (which the trainer shows in
# its before/after comparison) cover different tasks.
EVAL_ORDER = [
    "capitals",
    "translations",
    "opposites",
    "animals",
    "arithmetic",
    "colors",
    "letters",
    "persona",
]


def build() -> tuple[list[dict], list[dict]]:
    """(train, eval) records; each category's first HELD_OUT entries after a seeded shuffle go to eval."""
    rng = random.Random(SEED)
    train, held = [], {}
    for category, rows in _examples(rng).items():
        rows = list(rows)
        rng.shuffle(rows)
        cut = HELD_OUT[category]
        held[category] = [{"instruction": q, "input": x, "output": a} for q, x, a in rows[:cut]]
        train += [{"instruction": q, "input": x, "output": a} for q, x, a in rows[cut:]]
    rng.shuffle(train)
    interleaved = [held[c][i] for i in range(max(HELD_OUT.values())) for c in EVAL_ORDER if i < len(held[c])]
    return train, interleaved


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    train, held = build()
    write_jsonl(here / "train.jsonl", train)
    write_jsonl(here / "eval.jsonl", held)
    print(f"wrote {len(train)} train and {len(held)} eval records to {here}")
