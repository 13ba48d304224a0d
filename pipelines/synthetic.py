"""Deterministic synthetic corpora, the embedded default when nothing can be downloaded.

`biographies` renders Capo's bioS (ouro-spec.md §8.1): synthetic people, each with a full name and five
attributes (birth date, birth city, university, major, employer), one templated English sentence per
attribute, sentence order and templates drawn per biography. Same seed, same corpus.
"""

from __future__ import annotations

import random
from collections.abc import Callable
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
    """`count` people with distinct full names (first, middle, last), attributes from the small fixed pools."""
    return _draw_people(count, random.Random(seed), AttributePools(CITIES, UNIVERSITIES, MAJORS, EMPLOYERS))


def _draw_people(count: int, rng: random.Random, pools: AttributePools) -> list[Person]:
    names: set[str] = set()
    result = []
    while len(result) < count:
        name = f"{_word(rng)} {_word(rng)} {_word(rng)}"
        if name in names:
            continue
        names.add(name)
        date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1900, 2099)}"
        attributes = (pools.cities, pools.universities, pools.majors, pools.employers)
        result.append(Person(name, date, *(rng.choice(pool) for pool in attributes)))
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


# ---------------------------------------------------------------------------------------------------------------
# Profile pages: web-like documents built from bioS biographies, the base of the curation corpus.
# Capo's pools are tiny above (12 cities, ...), which makes every page a near-duplicate of every other under
# 5-gram shingles; pages draw from pools near Physics-3.3's sizes (200 cities, 300 universities, 100 majors,
# 263 employers), generated from syllables, and from more templates, so unrelated pages share few shingles.

_STATES = ("ME", "TX", "CO", "MA", "WA", "AZ", "NE", "WI", "NC", "CA", "FL", "OH", "OR", "NY", "GA", "MN", "IL")
_MAJOR_FIELDS = (
    "Business Analytics", "Marine Biology", "Civil Engineering", "Art History", "Statistics", "Philosophy",
    "Computer Science", "Nursing", "Economics", "Chemistry", "Linguistics", "Mechanical Engineering", "Geology",
    "Political Science", "Music Theory", "Public Health", "Architecture", "Astronomy", "Sociology", "Mathematics",
)  # fmt: skip
_MAJOR_KINDS = ("", "Applied ", "Comparative ", "Environmental ", "Theoretical ")
_EMPLOYER_KINDS = ("Industries", "Logistics", "Labs", "Foods", "Energy", "Health", "Systems", "Partners", "Media")

PAGE_TEMPLATES = {
    "birth_date": (
        "{name} celebrates their birthday on {value}.", "{name} was born on {value}.",
        "{name} came into the world on {value}.", "The birthday of {name} falls on {value}.",
        "{name} first opened their eyes on {value}.", "Records show that {name} was born on {value}.",
    ),
    "birth_city": (
        "{first} spent formative years in {value}.", "{first} was born in {value}.", "{first} grew up in {value}.",
        "The hometown of {first} is {value}.", "{first} hails from {value}.", "{first} was raised near {value}.",
    ),
    "university": (
        "{first} received their education at {value}.", "{first} graduated from {value}.",
        "{first} studied at {value}.", "{first} is an alumnus of {value}.", "{first} earned a degree at {value}.",
        "After school, {first} enrolled at {value}.",
    ),
    "major": (
        "{first} focused on {value}.", "{first} majored in {value}.", "The field {first} chose was {value}.",
        "{first} completed coursework in {value}.", "{first} developed an interest in {value}.",
        "{first} specialised in {value}.",
    ),
    "employer": (
        "{first} supported operations for {value}.", "{first} worked for {value}.", "{first} took a job at {value}.",
        "{first} is employed by {value}.", "{first} later joined {value}.", "The employer of {first} is {value}.",
    ),
}  # fmt: skip
PAGE_HEADERS = (
    "The following profiles are part of the {topic} and were updated this year.",
    "This page collects short biographies from the {topic} that readers have asked about.",
    "Here are some of the people featured in the {topic}, with the details that they shared.",
    "We are happy to introduce a few members of the {topic} to our readers.",
)
PAGE_TOPICS = ("alumni directory", "community newsletter", "regional archive", "membership list", "staff yearbook")


@dataclass(frozen=True)
class AttributePools:
    cities: tuple[str, ...]
    universities: tuple[str, ...]
    majors: tuple[str, ...]
    employers: tuple[str, ...]


def attribute_pools(seed: int = 0) -> AttributePools:
    """Pools of Physics-3.3's sizes: 200 cities, 300 universities, 100 majors, 263 employers."""
    rng = random.Random(seed + 7919)

    def distinct(count: int, make) -> tuple[str, ...]:
        values: dict[str, None] = {}
        while len(values) < count:
            values[make()] = None
        return tuple(values)

    cities = distinct(200, lambda: f"{_word(rng)}, {rng.choice(_STATES)}")
    patterns = ("University of {w}", "{w} University", "{w} College", "{w} Institute of Technology", "{w} State")
    universities = distinct(300, lambda: rng.choice(patterns).format(w=_word(rng)))
    majors = tuple(kind + field for kind in _MAJOR_KINDS for field in _MAJOR_FIELDS)
    employers = distinct(263, lambda: f"{_word(rng)} {rng.choice(_EMPLOYER_KINDS)} in {rng.choice(cities)}")
    return AttributePools(cities, universities, majors, employers)


def pool_people(count: int, seed: int = 0) -> list[Person]:
    """`count` people with distinct names and attributes drawn from `attribute_pools(seed)`."""
    return _draw_people(count, random.Random(seed + 104729), attribute_pools(seed))


def profile_biography(person: Person, rng: random.Random, templates: dict = PAGE_TEMPLATES) -> str:
    """A bioS biography whose later sentences name the person by first name (one sentence per attribute)."""
    fields = ["birth_city", "university", "major", "employer"]
    rng.shuffle(fields)
    first = person.name.split()[0]
    sentences = [rng.choice(templates["birth_date"]).format(name=person.name, value=person.birth_date)]
    sentences += [rng.choice(templates[f]).format(first=first, value=getattr(person, f)) for f in fields]
    return " ".join(sentences)


def profile_pages(count: int, seed: int = 0, people_per_page: int = 3) -> list[str]:
    """`count` web-like pages: a header sentence, then one paragraph per person (each person on one page)."""
    rng = random.Random(seed + 2)
    population = pool_people(count * people_per_page, seed)
    pages = []
    for i in range(count):
        header = rng.choice(PAGE_HEADERS).format(topic=rng.choice(PAGE_TOPICS))
        group = population[i * people_per_page : (i + 1) * people_per_page]
        pages.append("\n\n".join([header] + [profile_biography(p, rng) for p in group]))
    return pages


# ---------------------------------------------------------------------------------------------------------------
# Multi-hop QA on synthetic relations (ouro-spec.md §8.3, after Yao et al. 2025).

RELATIONS = (
    "instructor", "teacher", "mentor", "advisor", "supervisor", "coach", "tutor", "manager", "sponsor", "partner",
    "colleague", "neighbor", "friend", "rival", "guardian", "editor", "doctor", "landlord", "employer", "trainer",
)  # fmt: skip


@dataclass(frozen=True)
class MultiHopWorld:
    """People in layers; for each relation, every person in layer k links to one person in layer k + 1."""

    layers: tuple[tuple[str, ...], ...]
    relations: tuple[str, ...]
    links: dict[tuple[str, str], str]  # (person, relation) -> person in the next layer

    def follow(self, start: str, chain: tuple[str, ...]) -> str:
        """The person reached from `start` by applying `chain` innermost first (chain[-1] is applied first)."""
        person = start
        for relation in reversed(chain):
            person = self.links[(person, relation)]
        return person


@dataclass(frozen=True)
class QA:
    question: str
    answer: str

    @property
    def text(self) -> str:
        return f"{self.question} {self.answer}"


def multihop_world(seed: int = 0, num_layers: int = 5, per_layer: int = 100, num_relations: int = 20) -> MultiHopWorld:
    """Yao et al.'s setup: 5 layers of 100 single-word names, 20 relations, one random link per relation."""
    if num_relations > len(RELATIONS):
        raise ValueError(f"at most {len(RELATIONS)} relations are defined, asked for {num_relations}")
    rng = random.Random(seed + 31)
    names: dict[str, None] = {}
    while len(names) < num_layers * per_layer:
        names["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()] = None
    ordered = list(names)
    layers = tuple(tuple(ordered[k * per_layer : (k + 1) * per_layer]) for k in range(num_layers))
    relations = RELATIONS[:num_relations]
    links = {(p, r): rng.choice(layers[k + 1]) for k in range(num_layers - 1) for p in layers[k] for r in relations}
    return MultiHopWorld(layers, relations, links)


def multihop_facts(world: MultiHopWorld) -> list[str]:
    """One sentence per atomic fact: 'The instructor of A is B.'"""
    return [f"The {relation} of {person} is {target}." for (person, relation), target in world.links.items()]


def multihop_question(world: MultiHopWorld, start: str, chain: tuple[str, ...]) -> QA:
    relations = " of the ".join(chain)
    return QA(f"Who is the {relations} of {start}?\nAnswer:", world.follow(start, chain))


# The compact form: one token per person and relation, relations in the order they apply, no template words
# (Wang et al. 2024, "Grokked transformers are implicit reasoners"). A fact is 'A instructor B'; the question
# 'Who is the mentor of the instructor of A?' is 'A instructor mentor' with the same answer.


def multihop_compact_facts(world: MultiHopWorld) -> list[str]:
    return [f"{person} {relation} {target}" for (person, relation), target in world.links.items()]


def multihop_compact_question(world: MultiHopWorld, start: str, chain: tuple[str, ...]) -> QA:
    return QA(" ".join((start, *reversed(chain))), world.follow(start, chain))


def multihop_split(
    world: MultiHopWorld,
    hops: int = 3,
    train_count: int = 120_000,
    test_count: int = 3000,
    seed: int = 0,
    question: Callable[[MultiHopWorld, str, tuple[str, ...]], QA] = multihop_question,
) -> tuple[list[QA], list[QA]]:
    """Disjoint train and test k-hop questions from layer 0 (there are per_layer x |R|^k in all).

    The test set depends only on (world, hops, test_count, seed), not on train_count, so every consumer (the
    curation's decontamination, the evaluation step) sees the same held-out questions, in either form
    (`question`: multihop_question or multihop_compact_question).
    """
    starts, relations = world.layers[0], world.relations
    total = len(starts) * len(relations) ** hops
    if train_count + test_count > total:
        raise ValueError(f"{train_count} + {test_count} questions asked for, only {total} {hops}-hop ones exist")
    test = random.Random(seed + 37).sample(range(total), test_count)
    held_out = set(test)
    candidates = random.Random(seed + 38).sample(range(total), train_count + test_count)
    train = [i for i in candidates if i not in held_out][:train_count]

    def decode(index: int) -> QA:
        index, start = divmod(index, len(starts))
        chain = []
        for _ in range(hops):
            index, r = divmod(index, len(relations))
            chain.append(relations[r])
        return question(world, starts[start], tuple(chain))

    return [decode(i) for i in train], [decode(i) for i in test]


# ---------------------------------------------------------------------------------------------------------------
# Mano: modular arithmetic over prefix expression trees (ouro-spec.md §8.2).

MANO_MODULUS = 23
MANO_OPERATORS = ("+", "-", "*")


@dataclass(frozen=True)
class ManoProblem:
    num_operators: int
    expression: str  # prefix notation, space separated
    answer: int

    @property
    def text(self) -> str:
        """The training sequence: `<bos> <len_l> <prefix expression> <ans> <answer>`."""
        return f"<bos> <len_{self.num_operators}> {self.expression} <ans> {self.answer}"


def _mano_tree(num_operators: int, rng: random.Random) -> tuple[list[str], int]:
    if num_operators == 0:
        value = rng.randrange(MANO_MODULUS)
        return [str(value)], value
    left_ops = rng.randint(0, num_operators - 1)  # the left subtree's size, uniform (the re-implementation's rule)
    operator = rng.choice(MANO_OPERATORS)
    left, a = _mano_tree(left_ops, rng)
    right, b = _mano_tree(num_operators - 1 - left_ops, rng)
    value = {"+": a + b, "-": a - b, "*": a * b}[operator] % MANO_MODULUS
    return [operator, *left, *right], value


def mano_problem(num_operators: int, rng: random.Random) -> ManoProblem:
    tokens, value = _mano_tree(num_operators, rng)
    return ManoProblem(num_operators, " ".join(tokens), value)


def mano_problems(count: int, seed: int = 0, max_operators: int = 10) -> list[ManoProblem]:
    """`count` problems with l ~ Uniform[1, max_operators] operators over F_23 (L = 10, 16 or 24 in the paper)."""
    rng = random.Random(seed + 41)
    return [mano_problem(rng.randint(1, max_operators), rng) for _ in range(count)]


def evaluate_prefix(expression: str, modulus: int = MANO_MODULUS) -> int:
    """The value of a space-separated prefix expression modulo `modulus` (standard prefix semantics)."""
    tokens = expression.split()

    def parse(pos: int) -> tuple[int, int]:
        token = tokens[pos]
        if token in MANO_OPERATORS:
            a, pos = parse(pos + 1)
            b, pos = parse(pos)
            return {"+": a + b, "-": a - b, "*": a * b}[token] % modulus, pos
        return int(token) % modulus, pos + 1

    value, end = parse(0)
    if end != len(tokens):
        raise ValueError(f"trailing tokens in prefix expression {expression!r}")
    return value
