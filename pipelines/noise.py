"""Web-like defects planted into a clean corpus, with ground-truth labels, so curation can be scored.

`plant_defects(clean_docs, config, seed, eval_texts)` returns records {"id", "text", "meta"} whose
meta["defect"] names what was planted:

    clean             untouched
    exact_duplicate   a verbatim copy of a clean document (id: "<original>-dup<k>", sorting after the original)
    near_duplicate    a copy with contiguous word edits (replace, insert, delete) over at most max_edit_fraction of
                      its words; meta["edit_fraction"] records how much
    boilerplate       navigation, cookie and legal lines, the kind C4's and Gopher's rules catch
    spam              keyword stuffing and repeated lines, the kind Gopher's repetition rules catch
    foreign_language  a profile page rendered with German, French, Spanish or Italian templates
    pii               a clean document with e-mail addresses, phone numbers or IPv4 addresses inserted in place;
                      meta["pii"] lists the planted strings
    contaminated      a clean document with an evaluation question and its answer inserted in place

Each planted document carries exactly one defect, and copies are only ever made of documents left clean, so
each label says which step should remove (or redact) the document.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from looplm.pipelines.synthetic import MONTHS, Person, _word, pool_people, profile_biography

DEFECTS = (
    "exact_duplicate",
    "near_duplicate",
    "boilerplate",
    "spam",
    "foreign_language",
    "pii",
    "contaminated",
)


@dataclass(frozen=True)
class NoiseConfig:
    """Fractions of the clean document count planted for each defect."""

    exact_duplicate: float = 0.04
    near_duplicate: float = 0.04
    max_edit_fraction: float = 0.10
    boilerplate: float = 0.02
    spam: float = 0.02
    foreign_language: float = 0.03
    pii: float = 0.03
    contaminated: float = 0.01

    def __post_init__(self) -> None:
        for name in DEFECTS:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"noise.{name} must be a fraction in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.max_edit_fraction < 1.0:
            raise ValueError(f"noise.max_edit_fraction must be in (0, 1), got {self.max_edit_fraction}")


# Foreign-language profile templates (the same five bioS attributes); month names stay numeric in dates.
FOREIGN_TEMPLATES = {
    "de": {
        "header": "Die folgenden Profile stammen aus unserem Archiv und wurden in diesem Jahr aktualisiert.",
        "date": "{d}.{m}.{y}",
        "birth_date": ("{name} wurde am {value} geboren.", "{name} feiert am {value} den Geburtstag."),
        "birth_city": ("{first} verbrachte die Kindheit in {value}.", "{first} ist in {value} aufgewachsen."),
        "university": ("{first} hat an der {value} studiert.", "{first} schloss das Studium an der {value} ab."),
        "major": ("{first} interessierte sich vor allem für {value}.", "Das Hauptfach von {first} war {value}."),
        "employer": ("{first} arbeitete danach für {value}.", "Heute ist {first} bei {value} beschäftigt."),
    },
    "fr": {
        "header": "Les profils suivants font partie de nos archives et ont été mis à jour cette année.",
        "date": "{d}/{m}/{y}",
        "birth_date": ("{name} est né le {value}.", "{name} fête son anniversaire le {value}."),
        "birth_city": ("{first} a passé son enfance à {value}.", "{first} a grandi à {value}."),
        "university": ("{first} a fait ses études à {value}.", "{first} est diplômé de {value}."),
        "major": ("{first} s'est spécialisé en {value}.", "La matière principale de {first} était {value}."),
        "employer": ("{first} a travaillé pour {value}.", "Aujourd'hui, {first} est employé chez {value}."),
    },
    "es": {
        "header": "Los siguientes perfiles forman parte de nuestro archivo y se actualizaron este año.",
        "date": "{d}/{m}/{y}",
        "birth_date": ("{name} nació el {value}.", "{name} celebra su cumpleaños el {value}."),
        "birth_city": ("{first} pasó su infancia en {value}.", "{first} creció en {value}."),
        "university": ("{first} estudió en la {value}.", "{first} se graduó en la {value}."),
        "major": ("{first} se especializó en {value}.", "La carrera de {first} fue {value}."),
        "employer": ("{first} trabajó para {value}.", "Hoy {first} trabaja en {value}."),
    },
    "it": {
        "header": "I seguenti profili fanno parte del nostro archivio e sono stati aggiornati quest'anno.",
        "date": "{d}/{m}/{y}",
        "birth_date": ("{name} è nato il {value}.", "{name} festeggia il compleanno il {value}."),
        "birth_city": ("{first} ha trascorso l'infanzia a {value}.", "{first} è cresciuto a {value}."),
        "university": ("{first} ha studiato presso la {value}.", "{first} si è laureato presso la {value}."),
        "major": ("{first} si è specializzato in {value}.", "La materia principale di {first} era {value}."),
        "employer": ("{first} ha lavorato per {value}.", "Oggi {first} lavora per {value}."),
    },
}

_NAV = ("Home", "About us", "Contact", "Blog", "Shop", "Careers", "Press", "Help", "Login", "Sign up", "FAQ")
_BOILERPLATE_LINES = (
    "We use cookies to improve your experience. By continuing to browse you accept our cookie policy",
    "Please enable JavaScript in your browser to view this page",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor",
    "Copyright 2026 All rights reserved",
    "Terms of use | Privacy policy | Cookie settings",
    "Subscribe to our newsletter",
    "Share on Facebook | Share on Twitter | Share by e-mail",
    "Skip to main content",
    "Click here to read more",
    "Page 1 of 12 ...",
)
_SPAM_WORDS = ("buy", "cheap", "best", "price", "free", "pills", "watches", "deal", "casino", "bonus", "win", "now")
_EMAIL_DOMAINS = ("example.com", "mailhost.org", "inbox.net", "post.example.org")


def _foreign_page(people: list[Person], language: str, rng: random.Random) -> str:
    lang = FOREIGN_TEMPLATES[language]
    paragraphs = [lang["header"]]
    for person in people:
        month, rest = person.birth_date.split(" ", 1)
        day, year = rest.split(", ")
        date = lang["date"].format(d=day, m=MONTHS.index(month) + 1, y=year)
        localised = Person(person.name, date, person.birth_city, person.university, person.major, person.employer)
        paragraphs.append(profile_biography(localised, rng, templates=lang))
    return "\n\n".join(paragraphs)


def _boilerplate_page(rng: random.Random) -> str:
    lines = [" | ".join(rng.sample(_NAV, rng.randint(4, 8)))]
    lines += rng.sample(_BOILERPLATE_LINES, rng.randint(4, 8))
    lines.append(" | ".join(rng.sample(_NAV, rng.randint(4, 8))))
    return "\n".join(lines)


def _spam_page(rng: random.Random) -> str:
    phrase = " ".join(rng.sample(_SPAM_WORDS, 3))
    lines = []
    for _ in range(rng.randint(8, 16)):
        lines.append(f"{phrase} {' '.join(rng.choices(_SPAM_WORDS, k=rng.randint(2, 5)))} {phrase}!!!")
    return "\n".join(lines)


def _pii_values(rng: random.Random) -> list[tuple[str, str]]:
    first, last = (_word(rng).lower() for _ in range(2))
    email = f"{first}.{last}{rng.randint(1, 99)}@{rng.choice(_EMAIL_DOMAINS)}"
    area, exchange, line = rng.randint(201, 989), rng.randint(200, 999), rng.randint(0, 9999)
    phone = rng.choice(
        (
            f"({area}) {exchange}-{line:04d}",
            f"{area}-{exchange}-{line:04d}",
            f"+1 {area} {exchange} {line:04d}",
            f"+44 20 {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}",
        )
    )
    ip = ".".join(str(rng.randint(1, 254)) for _ in range(4))
    kinds = rng.sample([("email", email), ("phone", phone), ("ip", ip)], rng.randint(1, 3))
    return kinds


_PII_SENTENCES = {
    "email": "You can write to them at {value} for more details.",
    "phone": "Their office can be reached by phone at {value} during the week.",
    "ip": "The page was last edited from the address {value} by a volunteer.",
}


def _near_duplicate(text: str, max_fraction: float, vocabulary: list[str], rng: random.Random) -> tuple[str, float]:
    """One or two contiguous word edits (replace, insert or delete a span) over a drawn fraction of the words.

    Web near-duplicates usually differ in a region or two (a date line, a comment, a footer); the same number
    of edits scattered word by word breaks far more 5-gram shingles (each edited word breaks up to five).
    """
    words = text.split(" ")
    target = max(1, int(rng.uniform(0.01, max_fraction) * len(words)))
    spans = [target] if target < 2 or rng.random() < 0.5 else [target // 2, target - target // 2]
    edited = 0
    for span in spans:
        op = rng.choice(("replace", "insert", "delete"))
        start = rng.randrange(len(words))
        if op == "replace":
            span = min(span, len(words) - start)
            words[start : start + span] = rng.choices(vocabulary, k=span)
        elif op == "insert":
            words[start:start] = rng.choices(vocabulary, k=span)
        else:
            span = min(span, len(words) - start, len(words) - 1)
            del words[start : start + span]
        edited += span
    return " ".join(words), edited / len(text.split(" "))


def plant_defects(
    clean_docs: list[tuple[str, str]],
    config: NoiseConfig,
    seed: int = 0,
    eval_texts: list[str] | None = None,
) -> list[dict]:
    """The clean (id, text) documents with defects planted; see the module docstring for the labels."""
    rng = random.Random(seed + 97)
    n = len(clean_docs)
    records = [{"id": doc_id, "text": text, "meta": {"defect": "clean"}} for doc_id, text in clean_docs]
    order = list(range(n))
    rng.shuffle(order)
    counts = {name: round(getattr(config, name) * n) for name in DEFECTS}
    if counts["contaminated"] and not eval_texts:
        raise ValueError("noise.contaminated > 0 needs evaluation texts to plant")
    in_place = counts["pii"] + counts["contaminated"]
    if in_place > n:
        raise ValueError(f"{in_place} documents to modify in place but only {n} clean ones")
    pii_docs = order[: counts["pii"]]
    contaminated_docs = order[counts["pii"] : in_place]
    still_clean = order[in_place:] or order

    for i in pii_docs:
        record = records[i]
        planted = _pii_values(rng)
        paragraphs = record["text"].split("\n\n")
        for kind, value in planted:
            at = rng.randint(1, len(paragraphs))
            paragraphs.insert(at, _PII_SENTENCES[kind].format(value=value))
        record["text"] = "\n\n".join(paragraphs)
        record["meta"] = {"defect": "pii", "pii": [list(p) for p in planted]}

    for i in contaminated_docs:
        record = records[i]
        question = rng.choice(eval_texts)
        paragraphs = record["text"].split("\n\n")
        paragraphs.insert(rng.randint(1, len(paragraphs)), question)
        record["text"] = "\n\n".join(paragraphs)
        record["meta"] = {"defect": "contaminated", "eval_text": question}

    vocabulary = sorted({w for i in still_clean[:200] for w in clean_docs[i][1].split()})
    planted: list[dict] = []
    for k in range(counts["exact_duplicate"]):
        doc_id, text = clean_docs[rng.choice(still_clean)]
        planted.append({"id": f"{doc_id}-dup{k}", "text": text, "meta": {"defect": "exact_duplicate", "of": doc_id}})
    for k in range(counts["near_duplicate"]):
        doc_id, text = clean_docs[rng.choice(still_clean)]
        edited, fraction = _near_duplicate(text, config.max_edit_fraction, vocabulary, rng)
        meta = {"defect": "near_duplicate", "of": doc_id, "edit_fraction": round(fraction, 4)}
        planted.append({"id": f"{doc_id}-near{k}", "text": edited, "meta": meta})
    for k in range(counts["boilerplate"]):
        meta = {"defect": "boilerplate"}
        planted.append({"id": f"noise-boilerplate-{k:06d}", "text": _boilerplate_page(rng), "meta": meta})
    for k in range(counts["spam"]):
        planted.append({"id": f"noise-spam-{k:06d}", "text": _spam_page(rng), "meta": {"defect": "spam"}})
    foreign_people = pool_people(3 * counts["foreign_language"], seed + 1_000_003)
    for k in range(counts["foreign_language"]):
        language = rng.choice(sorted(FOREIGN_TEMPLATES))
        text = _foreign_page(foreign_people[3 * k : 3 * k + 3], language, rng)
        meta = {"defect": "foreign_language", "language": language}
        planted.append({"id": f"noise-foreign-{k:06d}", "text": text, "meta": meta})

    # Interleave planted documents among the clean ones at random places, deterministically.
    result = records + planted
    rng.shuffle(result)
    return result
