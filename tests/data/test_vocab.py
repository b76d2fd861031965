import numpy as np
import pytest

from ehrjax.data.vocab import CLS, MASK, NUM_SPECIAL, PAD, SEP, SPECIAL_TOKENS, UNK, Vocab


def test_special_tokens_come_first_with_fixed_ids():
    vocab = Vocab(["ICD10:I10", "RX:metformin"])
    assert vocab.codes[:NUM_SPECIAL] == SPECIAL_TOKENS
    assert (PAD, CLS, SEP, MASK, UNK) == (0, 1, 2, 3, 4)
    assert vocab.id("[PAD]") == PAD and vocab.id("[UNK]") == UNK
    assert vocab.id("ICD10:I10") == 5 and vocab.id("RX:metformin") == 6


def test_build_orders_by_count_then_name_and_applies_min_count():
    names = ["B", "A", "C", "D"]
    counts = np.array([5, 5, 1, 9])
    vocab = Vocab.build(names, counts, min_count=2)
    assert vocab.codes[NUM_SPECIAL:] == ("D", "A", "B")
    assert vocab.id("C") == UNK


def test_unknown_codes_map_to_unk_vectorised():
    vocab = Vocab(["X", "Y"])
    np.testing.assert_array_equal(vocab.ids(["Y", "nope", "X"]), [6, UNK, 5])
    assert vocab.ids([]).dtype == np.int32


def test_save_load_round_trip(tmp_path):
    vocab = Vocab(["ICD10:E11.9", "NOISE:0001"])
    vocab.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json") == vocab


@pytest.mark.parametrize(
    "content, message",
    [("not json", "cannot read JSON"), ('{"codes": ["a"]}', "special tokens"), ("[1, 2]", "'codes' list")],
)
def test_load_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "vocab.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        Vocab.load(path)


def test_bad_build_arguments():
    with pytest.raises(ValueError, match="min_count"):
        Vocab.build(["a"], np.array([1]), min_count=0)
    with pytest.raises(ValueError, match="unique"):
        Vocab(["a", "a"])
