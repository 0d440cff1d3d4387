"""Appendix B's data: OASST1 in Guanaco's format, split by conversation."""
import pytest

from qlora_mini.oasst1 import SPLITS, load_oasst1, split_oasst1


@pytest.fixture(scope="module")
def rows():
    return load_oasst1()


def test_the_shipped_file_is_the_extract_its_readme_describes(rows):
    # the README's counts: 953 rows, 419 in English; every input in Guanaco's format
    assert len(rows) == 953 and len(load_oasst1("en")) == 419
    assert all(r["input"].startswith("### Human: ") and r["input"].endswith("### Assistant:")
               for r in rows)
    assert all(r["output"].strip() for r in rows)


def test_a_conversation_never_crosses_splits(rows):
    """Independently of the first-turn hash: a row whose conversation continues another row's
    (its input starts with that row's input and reply) must share that row's split."""
    splits = split_oasst1(rows, seed=0)
    where = {r["message_id"]: name for name, part in splits.items() for r in part}
    pairs = 0
    for later in rows:
        for earlier in rows:
            if later is not earlier and later["input"].startswith(earlier["input"]):
                pairs += 1
                assert where[later["message_id"]] == where[earlier["message_id"]]
    assert pairs > 100   # the file has many continued conversations: the test is not vacuous


def test_split_is_seeded_and_near_its_shares(rows):
    a, b, c = (split_oasst1(rows, seed=s) for s in (0, 0, 1))
    assert {k: [r["message_id"] for r in v] for k, v in a.items()} == \
        {k: [r["message_id"] for r in v] for k, v in b.items()}
    assert a["heldout"] != c["heldout"]
    assert sum(len(v) for v in a.values()) == len(rows)
    conversations = {name: {r["input"].split("### Assistant:")[0] for r in part}
                     for name, part in a.items()}
    n = sum(len(v) for v in conversations.values())
    for name, share in SPLITS.items():   # binomial: within 4 standard deviations of its share
        sd = (share * (1 - share) / n) ** 0.5
        assert abs(len(conversations[name]) / n - share) < 4 * sd, name
