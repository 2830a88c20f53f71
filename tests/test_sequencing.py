from hypothesis import given
from hypothesis import strategies as st

from edge.sequencing import U32, admit, last_of

seqs = st.integers(0, U32 - 1)


def test_first_sample_is_accepted_without_gap():
    assert admit(None, 17, 3).first_new == 17


def test_duplicate_and_gap():
    assert admit(5, 5, 1).duplicates == 1
    assert admit(5, 3, 1).duplicates == 1
    a = admit(5, 9, 1)
    assert (a.duplicates, a.gap, a.first_new) == (0, 3, 9)


def test_partial_overlap_applies_only_the_new_tail():
    a = admit(10, 8, 5)  # samples 8..12; 8, 9, 10 already applied
    assert (a.duplicates, a.gap, a.first_new) == (3, 0, 11)


def test_wraparound_is_in_order():
    a = admit(U32 - 1, 0, 1)
    assert (a.duplicates, a.gap, a.first_new) == (0, 0, 0)
    assert admit(2, U32 - 2, 1).duplicates == 1  # far behind across the wrap
    assert last_of(U32 - 2, 4) == 1


@given(seqs, st.integers(1, 2**31 - 1), st.integers(1, 50))
def test_anything_ahead_is_never_a_duplicate(last, ahead, k):
    a = admit(last, (last + ahead) % U32, k)
    assert a.duplicates == 0 and a.gap == ahead - 1


@given(seqs, st.integers(0, 2**31 - 1), st.integers(1, 50))
def test_replays_never_readmit_applied_samples(last, behind, k):
    a = admit(last, (last - behind) % U32, k)
    assert a.duplicates == min(k, behind + 1)
    if a.first_new is not None:
        assert a.first_new == (last + 1) % U32 and a.gap == 0
