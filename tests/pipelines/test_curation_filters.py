"""Each per-document step on hand-made documents that it must keep and ones it must remove or change."""

import pytest

from looplm.pipelines.curation.decontam import EvalIndex
from looplm.pipelines.curation.langid import LangIdConfig, identify, language_verdict
from looplm.pipelines.curation.normalize import normalize_text
from looplm.pipelines.curation.pii import PIIConfig, redact
from looplm.pipelines.curation.quality import (
    C4Config,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    QualityConfig,
    c4,
    fineweb,
    gopher_quality,
    gopher_repetition,
    quality_verdict,
)

GOOD = (
    "The river town grew slowly over the first decades of the century. Farmers brought their grain to the mill "
    "and traders came up the water with salt, cloth and iron tools.\n\n"
    "By the time the railway arrived, the town had a school, two churches and a small library that was run by "
    "volunteers. Its records show that most families stayed for generations, and that the population doubled "
    "between the wars. Today the old mill is a museum, and visitors can still see the wheel turning in spring."
)


def test_normalize_repairs_mojibake_composes_and_collapses_whitespace():
    assert normalize_text("cafÃ©  au\tlait") == "café au lait"  # UTF-8 read as Latin-1, repaired
    assert normalize_text("cafe\u0301") == "caf\u00e9"  # combining accent composed (NFC)
    assert normalize_text("  a  \n\n\n\n  b \n") == "a\n\n b"  # runs collapse; a line keeps one indent space
    assert normalize_text(GOOD) == GOOD  # clean text is left alone


def test_langid_keeps_english_and_removes_others_and_low_scores():
    config = LangIdConfig(languages=("en",), threshold=0.65)
    (en, en_score), (de, _), (fr, _) = identify(
        [
            GOOD,
            "Der Zug kam am späten Abend an, und die Reisenden gingen müde durch die leeren Straßen der Stadt.",
            "Le train est arrivé tard le soir et les voyageurs ont traversé les rues vides de la ville.",
        ]
    )
    assert (en, de, fr) == ("en", "de", "fr")
    assert language_verdict(en, en_score, config) == ("", "")
    step, reason = language_verdict(de, 0.99, config)
    assert step == "langid" and "not in en" in reason
    step, reason = language_verdict("en", 0.40, config)  # a kept language below the threshold: named apart
    assert step == "langid_score" and "score 0.40 < 0.65" in reason
    assert language_verdict("de", 0.9, LangIdConfig(languages=("en", "de"))) == ("", "")


def test_gopher_repetition():
    config = GopherRepetitionConfig()
    assert gopher_repetition(GOOD, config)[0] == ""
    repeated_lines = "\n".join(["Buy now and save big today!"] * 6 + ["A different closing line here."])
    assert "duplicate paragraph" in gopher_repetition(repeated_lines.replace("\n", "\n\n"), config)[0]
    assert "duplicate lines" in gopher_repetition(repeated_lines, config)[0]
    stuffed = " ".join(["cheap watches"] * 30) + " and a few other words to end the sentence."
    assert "top 2-gram" in gopher_repetition(stuffed, config)[0]
    # A repeated 10-word run inside otherwise varied prose: duplicated n-gram share above 0.10.
    run = "the quick brown fox jumps over the lazy dog again"
    repeated_ngrams = f"{GOOD} {run} then {run} and finally {run} once more."
    assert "duplicated" in gopher_repetition(repeated_ngrams, config)[0]


def test_gopher_quality():
    config = GopherQualityConfig()
    assert gopher_quality(GOOD, config)[0] == ""
    assert "words < 50" in gopher_quality("A short note with a few words.", config)[0]
    assert "stop words" in gopher_quality(" ".join(["Lorem dolor sit amet consectetur."] * 12), config)[0]
    assert "mean word length" in gopher_quality(" ".join(["a b c to of"] * 20), config)[0]
    assert "hash-to-word" in gopher_quality(GOOD + " #tag" * 30, config)[0]
    numbers = "The values are " + " ".join(str(i) for i in range(1000, 1200)) + " and that is the end of the list."
    assert "words with a letter" in gopher_quality(numbers, config)[0]
    bullets = "\n".join(f"- item number {i} of the list that goes on with the rest" for i in range(20))
    assert "bullet lines" in gopher_quality(bullets, config)[0]


def test_c4_removes_documents_and_lines():
    config = C4Config()
    assert c4(GOOD, config) == ("", GOOD)
    assert c4(GOOD + "\nLorem ipsum dolor sit amet.", config)[0] == "c4: lorem ipsum"
    assert c4(GOOD + "\nfunction f() { return 1; }", config)[0] == "c4: curly bracket"
    reason, text = c4(GOOD + "\nPlease enable JavaScript to view this page.\nRead our privacy policy here.", config)
    assert reason == "" and "JavaScript" not in text and "privacy" not in text and "railway" in text
    assert "sentences < 5" in c4("One sentence here. Two sentences here.", config)[0]
    # FineWeb's setting keeps lines without terminal punctuation; C4's original removes them.
    no_punct = GOOD + "\nA line without an end mark"
    assert "without an end mark" in c4(no_punct, config)[1]
    assert "without an end mark" not in c4(no_punct, C4Config(filter_no_terminal_punct=True))[1]


def test_fineweb_rules():
    config = FineWebConfig()
    assert fineweb(GOOD, config)[0] == ""
    menu = "\n".join(["Home", "About us", "Products and services", "Contact", "Blog archive"] * 2)
    assert "lines ending in punctuation" in fineweb(menu, config)[0]
    short = "\n".join(f"Short line {i}." for i in range(10)) + "\n" + GOOD
    assert "short lines" in fineweb(short, config)[0]
    dup = GOOD + "\nThe same closing line appears twice.\nThe same closing line appears twice."
    assert "duplicate line chars" in fineweb(dup, config)[0]
    listing = "\n".join(f"Item {i}." for i in range(40))  # 3 words per line
    assert fineweb(listing, FineWebConfig(short_line_thr=1.1))[0].startswith("fineweb: newlines per word")


def test_quality_verdict_reports_the_first_failing_filter():
    assert quality_verdict(GOOD, QualityConfig()) == ("", "", GOOD, ())
    # 30 distinct words: no repetition, but under Gopher's 50-word minimum.
    step, reason, _, _ = quality_verdict(" ".join(f"token{i}" for i in range(30)) + ".", QualityConfig())
    assert step == "gopher_quality" and reason.startswith("gopher_quality")


def test_pii_redacts_emails_ips_and_phones_but_not_dates():
    config = PIIConfig()
    text = (
        "Write to jane.doe42@example.org or call (415) 555-0134 or +44 20 7946 0958. "
        "The server 192.168.10.254 answered. Born on January 24, 1914; version 1.2.3; score 3-2; year 2024."
    )
    redacted, found = redact(text, config)
    assert found == [
        ("email", "jane.doe42@example.org"),
        ("ip", "192.168.10.254"),
        ("phone", "(415) 555-0134"),
        ("phone", "+44 20 7946 0958"),
    ]
    assert "|||EMAIL_ADDRESS|||" in redacted and "|||IP_ADDRESS|||" in redacted
    assert redacted.count("|||PHONE_NUMBER|||") == 2
    assert "January 24, 1914" in redacted and "1.2.3" in redacted and "3-2" in redacted
    assert redact(GOOD, config) == (GOOD, [])
    assert redact("not an ip: 999.1.1.1", config)[1] == []


def test_decontam_matches_13_grams_and_whole_short_items():
    question = "Who is the instructor of the teacher of the mentor of Bob?\nAnswer: Carol"  # 14 words
    index = EvalIndex([question, "What is two plus two?"], n=13)
    assert index.first_match(f"{GOOD}\n{question}") != ""
    # Punctuation and case do not hide a match; one changed word inside every 13-gram does.
    assert index.first_match("WHO IS THE INSTRUCTOR of the teacher, of the mentor of bob answer carol") != ""
    assert index.first_match("who is the instructor of the teacher of the coach of bob answer carol") == ""
    assert index.first_match("So: what is two plus two? Four.") == "what is two plus two"
    assert index.first_match("what is two plus three") == ""
    assert index.first_match(GOOD) == ""


@pytest.mark.parametrize("n", [5, 13])
def test_decontam_n_is_configurable(n):
    index = EvalIndex(["one two three four five six seven eight nine ten eleven twelve thirteen"], n=n)
    assert (index.first_match("x one two three four five y") != "") == (n == 5)


def test_ngram_statistics_match_datatrove_string_implementation():
    """The numpy n-gram statistics against datatrove's string-joining definitions, on pages and planted spam."""
    from collections import Counter

    from looplm.pipelines.curation import quality
    from looplm.pipelines.noise import NoiseConfig, plant_defects
    from looplm.pipelines.synthetic import profile_pages

    def top_reference(words, n):
        counts = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
        if not counts:
            return 0
        gram, count = counts.most_common(1)[0]
        return len(gram) * count

    def repeated_reference(words, n):
        seen, chars, i = set(), 0, 0
        while i < len(words) - n + 1:
            gram = "".join(words[i : i + n])
            if gram in seen:
                chars, i = chars + len(gram), i + n
            else:
                seen.add(gram)
                i += 1
        return chars

    clean = [(str(i), t) for i, t in enumerate(profile_pages(60, seed=1))]
    noisy = plant_defects(clean, NoiseConfig(spam=0.5, boilerplate=0.5, contaminated=0.0), seed=1)
    texts = [r["text"] for r in noisy] + ["a b a b a b c", "x y z x y z x y z w", "", "one", "a a a a a a a a"]
    for text in texts:
        words = quality.words_of(text)
        grams = quality._Grams(words)
        for n in (2, 3, 4):
            assert quality._top_ngram_chars(grams, n) == top_reference(words, n), (text[:40], n)
        for n in range(5, 11):
            assert quality._repeated_ngram_chars(grams, n) == repeated_reference(words, n), (text[:40], n)
