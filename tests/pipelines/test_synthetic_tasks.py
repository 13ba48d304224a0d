"""The generators added for curation: profile pages, multi-hop QA (§8.3) and Mano (§8.2)."""

import random

import pytest

from looplm.pipelines import synthetic


def test_mano_answers_match_an_independent_prefix_evaluator():
    problems = synthetic.mano_problems(300, seed=3, max_operators=10)
    assert problems == synthetic.mano_problems(300, seed=3, max_operators=10)
    for p in problems:
        tokens = p.expression.split()
        assert sum(t in synthetic.MANO_OPERATORS for t in tokens) == p.num_operators
        assert 1 <= p.num_operators <= 10
        # Independent evaluation: a stack machine over the reversed prefix expression.
        stack = []
        for token in reversed(tokens):
            if token in synthetic.MANO_OPERATORS:
                a, b = stack.pop(), stack.pop()
                stack.append({"+": a + b, "-": a - b, "*": a * b}[token] % 23)
            else:
                stack.append(int(token))
        assert stack == [p.answer]
        assert p.text == f"<bos> <len_{p.num_operators}> {p.expression} <ans> {p.answer}"


def test_prefix_semantics_follow_the_standard_reading():
    # "- * a b + c d" is (a*b) - (c+d), not the paper's gloss (a*b) + (c-d).
    assert synthetic.evaluate_prefix("- * 3 4 + 5 6") == (3 * 4 - (5 + 6)) % 23
    with pytest.raises(ValueError, match="trailing"):
        synthetic.evaluate_prefix("+ 1 2 3")


def test_multihop_world_follows_links_layer_by_layer():
    world = synthetic.multihop_world(seed=1)
    assert [len(layer) for layer in world.layers] == [100] * 5
    assert len(world.relations) == 20
    assert len({name for layer in world.layers for name in layer}) == 500
    start = world.layers[0][7]
    chain = ("teacher", "mentor", "coach")  # coach first, then mentor, then teacher
    expected = world.links[(world.links[(world.links[(start, "coach")], "mentor")], "teacher")]
    assert world.follow(start, chain) == expected
    assert expected in world.layers[3]
    qa = synthetic.multihop_question(world, start, chain)
    assert qa.question == f"Who is the teacher of the mentor of the coach of {start}?\nAnswer:"
    assert qa.answer == expected
    facts = synthetic.multihop_facts(world)
    assert len(facts) == 4 * 100 * 20
    assert f"The coach of {start} is {world.links[(start, 'coach')]}." in facts


def test_multihop_test_set_is_held_out_and_independent_of_train_size():
    world = synthetic.multihop_world(seed=0)
    train, test = synthetic.multihop_split(world, train_count=5000, test_count=3000, seed=0)
    _, test_again = synthetic.multihop_split(world, train_count=10, test_count=3000, seed=0)
    assert test == test_again
    assert len(test) == 3000 and len(train) == 5000
    assert not {q.question for q in train} & {q.question for q in test}
    for qa in random.Random(0).sample(test, 50):
        start = qa.question.rsplit(" of ", 1)[1].split("?")[0]
        chain = tuple(qa.question.removeprefix("Who is the ").split(" of ")[:-1])
        chain = tuple(c.removeprefix("the ") for c in chain)
        assert world.follow(start, chain) == qa.answer
    with pytest.raises(ValueError, match="only 800000"):
        synthetic.multihop_split(world, train_count=800_000, test_count=3000)


def test_compact_questions_are_the_text_questions_relations_in_the_order_they_apply():
    world = synthetic.multihop_world(seed=0)
    start = world.layers[0][3]
    compact = synthetic.multihop_compact_question(world, start, ("teacher", "mentor", "coach"))
    assert compact.question == f"{start} coach mentor teacher"  # coach applies first
    assert compact.answer == world.follow(start, ("teacher", "mentor", "coach"))
    assert f"{start} coach {world.links[(start, 'coach')]}" in synthetic.multihop_compact_facts(world)
    text_train, text_test = synthetic.multihop_split(world, train_count=300, test_count=200, seed=1)
    train, test = synthetic.multihop_split(
        world, train_count=300, test_count=200, seed=1, question=synthetic.multihop_compact_question
    )
    for ours, theirs in zip(train + test, text_train + text_test, strict=True):  # the same split, question by question
        first, *relations = ours.question.split()
        chain = tuple(reversed(relations))
        assert theirs == synthetic.multihop_question(world, first, chain) and ours.answer == theirs.answer


def test_profile_pages_are_deterministic_and_carry_every_attribute():
    pages = synthetic.profile_pages(5, seed=2, people_per_page=3)
    assert pages == synthetic.profile_pages(5, seed=2, people_per_page=3)
    people = synthetic.pool_people(15, seed=2)
    for i, page in enumerate(pages):
        paragraphs = page.split("\n\n")
        assert len(paragraphs) == 4  # header + one per person
        for person in people[3 * i : 3 * i + 3]:
            for value in (person.name, person.birth_date, person.birth_city, person.university, person.major):
                assert value in page
    pools = synthetic.attribute_pools(0)
    assert (len(pools.cities), len(pools.universities), len(pools.majors), len(pools.employers)) == (
        200,
        300,
        100,
        263,
    )
