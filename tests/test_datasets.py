"""replay.datasets: the S3-Rec loader (folder and file forms), its errors, leave-one-out, real Beauty."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from replay.datasets import DataError, leave_one_out, load_s3rec

BEAUTY = Path(__file__).resolve().parents[2] / "shared/datasets/amazon_beauty"

SEQUENCES = "1 1 2 3 4\n2 2 3 5\n3 4 5 6 1 2\n4 3 6\n"
TIMESTAMPS = "1 10 20 30 40\n2 11 21 31\n3 12 22 32 42 52\n4 13 23\n"
ATTRIBUTES = {"1": [1, 2], "2": [3], "5": [], "6": [2]}


def write_dataset(
    folder: Path,
    name: str = "Toy",
    sequences: str = SEQUENCES,
    timestamps: str | None = TIMESTAMPS,
    attributes: dict | str | None = None,
) -> Path:
    """Write an S3-Rec dataset; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.txt").write_text(sequences)
    if timestamps is not None:
        (folder / f"{name}_timestamps.txt").write_text(timestamps)
    attributes = ATTRIBUTES if attributes is None else attributes
    if attributes != "":
        text = attributes if isinstance(attributes, str) else json.dumps(attributes)
        (folder / f"{name}_item2attributes.json").write_text(text)
    return folder


def expect_error(path: Path, file: Path, line: int | None, reason: str) -> None:
    with pytest.raises(DataError) as info:
        load_s3rec(path)
    msg = str(info.value)
    where = f"{file}:{line}: " if line is not None else f"{file}: "
    assert msg.startswith(where), msg
    assert re.search(reason, msg), msg


# ----------------------------------------------------------------- loading


def test_load_folder_and_file_forms(tmp_path):
    folder = write_dataset(tmp_path / "toy")
    by_folder = load_s3rec(folder)
    by_file = load_s3rec(folder / "Toy.txt")
    for ds in (by_folder, by_file):
        assert ds.name == "Toy"
        assert ds.user_ids.tolist() == [1, 2, 3, 4]
        assert [s.tolist() for s in ds.sequences] == [[1, 2, 3, 4], [2, 3, 5], [4, 5, 6, 1, 2], [3, 6]]
        assert all(s.dtype == np.int64 for s in ds.sequences)
        assert ds.num_items == 6 and ds.num_users == 4 and ds.num_interactions == 14
        assert ds.summary() == {"name": "Toy", "users": 4, "items": 6, "interactions": 14}
        assert [t.tolist() for t in ds.timestamps] == [[10, 20, 30, 40], [11, 21, 31], [12, 22, 32, 42, 52],
                                                       [13, 23]]
        assert ds.item_attributes == {1: [1, 2], 2: [3], 6: [2]}  # item 5 has none: absent
        assert ds.num_attributes == 3


def test_optional_files_may_be_absent(tmp_path):
    folder = write_dataset(tmp_path / "bare", name="Bare_set", timestamps=None, attributes="")
    ds = load_s3rec(folder / "Bare_set.txt")
    assert ds.timestamps is None
    assert ds.item_attributes == {} and ds.num_attributes == 0
    assert ds.name == "Bare_set"


def test_blank_lines_are_skipped_and_line_numbers_count_them(tmp_path):
    folder = write_dataset(tmp_path / "d", sequences="1 1 2\n\n2 3 x\n", timestamps=None, attributes="")
    expect_error(folder, folder / "Toy.txt", 3, "not an integer: 'x'")


# ----------------------------------------------------------------- malformed files


def test_non_integer_token(tmp_path):
    folder = write_dataset(tmp_path / "d", sequences="1 1 2 3\n2 2 3.5 5\n")
    expect_error(folder, folder / "Toy.txt", 2, r"not an integer: '3\.5'")


def test_non_integer_timestamp(tmp_path):
    folder = write_dataset(tmp_path / "d", timestamps="1 10 20 30 40\n2 11 2l 31\n3 1 2 3 4 5\n4 1 2\n")
    expect_error(folder, folder / "Toy_timestamps.txt", 2, "not an integer: '2l'")


def test_double_minus_token_is_a_data_error(tmp_path):
    folder = write_dataset(tmp_path / "d", sequences="1 1 2\n2 3 --5\n", timestamps=None, attributes="")
    expect_error(folder, folder / "Toy.txt", 2, "not an integer: '--5'")


def test_item_zero_is_rejected(tmp_path):
    folder = write_dataset(tmp_path / "d", sequences="1 1 2\n2 0 3\n", timestamps=None)
    expect_error(folder, folder / "Toy.txt", 2, r"item ids must be >= 1")


def test_user_without_items(tmp_path):
    folder = write_dataset(tmp_path / "d", sequences="1 1 2\n7\n", timestamps=None)
    expect_error(folder, folder / "Toy.txt", 2, "a user with no items")


def test_timestamps_misaligned_count(tmp_path):
    folder = write_dataset(tmp_path / "d", timestamps="1 10 20 30 40\n2 11 21 31\n3 12 22 32 42\n4 13 23\n")
    expect_error(folder, folder / "Toy_timestamps.txt", 3, "4 timestamps for 5 items")


def test_timestamps_user_mismatch(tmp_path):
    bad = TIMESTAMPS.replace("2 11 21 31", "9 11 21 31")
    folder = write_dataset(tmp_path / "d", timestamps=bad)
    expect_error(folder, folder / "Toy_timestamps.txt", 2, "user 9 where Toy.txt has 2")


def test_timestamps_line_count_mismatch(tmp_path):
    folder = write_dataset(tmp_path / "d", timestamps="1 10 20 30 40\n2 11 21 31\n")
    expect_error(folder, folder / "Toy_timestamps.txt", None, "2 lines, but Toy.txt has 4")


def test_bad_json(tmp_path):
    folder = write_dataset(tmp_path / "d", attributes='{"1": [1, 2],\n "2": }\n')
    expect_error(folder, folder / "Toy_item2attributes.json", 2, "invalid JSON")


def test_json_that_is_not_an_object(tmp_path):
    folder = write_dataset(tmp_path / "d", attributes="[1, 2]")
    expect_error(folder, folder / "Toy_item2attributes.json", 1, "expected an object")


def test_missing_path_and_ambiguous_folder(tmp_path):
    expect_error(tmp_path / "nope", tmp_path / "nope", None, "no such file or folder")
    folder = write_dataset(tmp_path / "two")
    (folder / "Other.txt").write_text("1 1 2\n")
    with pytest.raises(DataError, match="expected exactly one <Name>.txt"):
        load_s3rec(folder)
    assert load_s3rec(folder / "Toy.txt").num_users == 4  # the file form still works


def test_folder_whose_name_has_underscores(tmp_path):
    """Issue 16: `sparc evaluate --data DIR` refused a standard S3-Rec folder named `<Name_with_parts>.txt`
    ("found none"). Any name works, with or without timestamps, beside S3-Rec's `_sample.txt` negatives."""
    bare = write_dataset(tmp_path / "bare", name="Toys_and_Games", timestamps=None, attributes="")
    with_attrs = write_dataset(tmp_path / "attrs", name="Toys_and_Games", timestamps=None)
    (with_attrs / "Toys_and_Games_sample.txt").write_text("1 9 8 7\n")
    full = write_dataset(tmp_path / "full", name="Cell_Phones_and_Accessories")
    (full / "Cell_Phones_and_Accessories_sample.txt").write_text("1 9 8 7\n")
    for folder, name in ((bare, "Toys_and_Games"), (with_attrs, "Toys_and_Games"),
                         (full, "Cell_Phones_and_Accessories")):
        ds = load_s3rec(folder)
        assert ds.name == name and ds.num_users == 4 and ds.num_interactions == 14
    assert load_s3rec(with_attrs).num_attributes == 3
    assert load_s3rec(full).timestamps is not None


def test_side_tables_with_underscores_do_not_make_a_folder_ambiguous(tmp_path):
    folder = write_dataset(tmp_path / "ml", name="ml-1m", timestamps=None, attributes="")
    (folder / "ml-1m_seq.txt").write_text("1 1 2 3\n")  # a companion by name
    (folder / "sas_to_original_items.txt").write_text("1 1198\n2 3552\n")  # an id map, no companions
    assert load_s3rec(folder).name == "ml-1m"
    (folder / "Other_name.txt").write_text("1 1 2\n")
    (folder / "Other_name_item2attributes.json").write_text("{}")
    with pytest.raises(DataError, match="found Other_name.txt, ml-1m.txt"):
        load_s3rec(folder)


# ----------------------------------------------------------------- leave-one-out


def test_leave_one_out_contents(tmp_path):
    split = leave_one_out(load_s3rec(write_dataset(tmp_path / "toy")))
    assert split.num_items == 6
    # user 4 has only two items: train only
    assert [t.tolist() for t in split.train] == [[1, 2], [2], [4, 5, 6], [3, 6]]
    assert [t.tolist() for t in split.valid_inputs] == [[1, 2], [2], [4, 5, 6]]
    assert split.valid_targets.tolist() == [3, 3, 1]
    assert [t.tolist() for t in split.test_inputs] == [[1, 2, 3], [2, 3], [4, 5, 6, 1]]
    assert split.test_targets.tolist() == [4, 5, 2]
    assert split.test_lengths.tolist() == [4, 3, 5]
    # the test target is never in train and the validation target is the test input's last item
    for inputs, train, valid in zip(split.test_inputs, split.train, split.valid_targets, strict=False):
        assert inputs[-1] == valid and len(train) == len(inputs) - 1


# ----------------------------------------------------------------- the real data


@pytest.mark.slow
def test_real_beauty_dataset():
    if not BEAUTY.is_dir():
        message = f"the Amazon Beauty dataset is missing at {BEAUTY}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    ds = load_s3rec(BEAUTY)
    assert ds.name == "Beauty"
    assert ds.num_users == 22_363
    assert ds.num_items == 12_101
    assert ds.num_interactions == 198_502
    assert ds.num_attributes == 637
    assert ds.timestamps is not None
    assert all(len(t) == len(s) for t, s in zip(ds.timestamps, ds.sequences, strict=True))
    assert min(len(s) for s in ds.sequences) >= 5  # 5-core
    split = leave_one_out(ds)
    assert len(split.test_targets) == len(split.valid_targets) == 22_363
