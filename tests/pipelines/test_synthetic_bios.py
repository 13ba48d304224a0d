from looplm.pipelines import synthetic


def test_biographies_are_deterministic_and_mention_every_attribute():
    a = synthetic.biographies(20, seed=7, exposures=2)
    assert a == synthetic.biographies(20, seed=7, exposures=2)
    assert a != synthetic.biographies(20, seed=8, exposures=2)
    assert len(a) == 40
    people = synthetic.people(20, seed=7)
    assert len({p.name for p in people}) == 20
    for person, text in zip(people, a[:20], strict=True):
        for value in (person.name, person.birth_date, person.birth_city, person.university, person.major):
            assert value in text
