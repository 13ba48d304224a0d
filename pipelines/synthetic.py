"""Deterministic synthetic corpora, the embedded default when nothing can be downloaded.

`biographies` renders Capo's bioS (ouro-spec.md §8.1): synthetic people, each with a full name and five
attributes (birth date, birth city, university, major, employer), one templated English sentence per
attribute, sentence order and templates drawn per biography. Same seed, same corpus.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_SYLLABLES = ("ka", "lo", "mi", "ra", "den", "sa", "vel", "tor", "an", "bri", "co", "el", "fi", "gar", "hu", "is")
CITIES = (
    "Portland, ME", "Austin, TX", "Denver, CO", "Boston, MA", "Seattle, WA", "Tucson, AZ", "Omaha, NE",
    "Madison, WI", "Raleigh, NC", "Fresno, CA", "Tampa, FL", "Dayton, OH",
)  # fmt: skip
UNIVERSITIES = (
    "Pepperdine University", "Rice University", "Tufts University", "Purdue University", "Emory University",
    "Baylor University", "Clemson University", "Drexel University",
)  # fmt: skip
MAJORS = (
    "Business Analytics", "Marine Biology", "Civil Engineering", "Art History", "Statistics", "Philosophy",
    "Computer Science", "Nursing",
)  # fmt: skip
EMPLOYERS = (
    "Delta Air Lines Inc. in Atlanta, GA", "Mayo Clinic in Rochester, MN", "Boeing in Chicago, IL",
    "Nike in Beaverton, OR", "Intel in Santa Clara, CA", "Pfizer in New York, NY",
)  # fmt: skip
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)  # fmt: skip

TEMPLATES = {
    "birth_date": (
        "{name} celebrates their birthday on {value}.",
        "{name} was born on {value}.",
    ),
    "birth_city": ("They spent formative years in {value}.", "They were born in {value}."),
    "university": ("They received their education at {value}.", "They graduated from {value}."),
    "major": ("They focused on {value}.", "They majored in {value}."),
    "employer": ("They supported operations for {value}.", "They worked for {value}."),
}


@dataclass(frozen=True)
class Person:
    name: str
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def people(count: int, seed: int = 0) -> list[Person]:
    """`count` people with distinct full names (first, middle, last)."""
    rng = random.Random(seed)
    names: set[str] = set()
    result = []
    while len(result) < count:
        name = f"{_word(rng)} {_word(rng)} {_word(rng)}"
        if name in names:
            continue
        names.add(name)
        date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1900, 2099)}"
        result.append(
            Person(
                name,
                date,
                rng.choice(CITIES),
                rng.choice(UNIVERSITIES),
                rng.choice(MAJORS),
                rng.choice(EMPLOYERS),
            )
        )
    return result


def biography(person: Person, rng: random.Random) -> str:
    """One bioS text: the birth-date sentence names the person; the rest follow in random order."""
    fields = ["birth_city", "university", "major", "employer"]
    rng.shuffle(fields)
    sentences = [rng.choice(TEMPLATES["birth_date"]).format(name=person.name, value=person.birth_date)]
    sentences += [rng.choice(TEMPLATES[f]).format(value=getattr(person, f)) for f in fields]
    return " ".join(sentences)


def biographies(count: int, seed: int = 0, exposures: int = 1) -> list[str]:
    """bioS texts for `count` people, each rendered `exposures` times with fresh templates and order."""
    rng = random.Random(seed + 1)
    population = people(count, seed)
    return [biography(p, rng) for _ in range(exposures) for p in population]
