"""Deterministic, file-level split assignment.

A file's split depends on its stem alone (`BLA_00001`, taken from the file name without folders or
extension), never on which other files exist, so adding or removing files moves no other file, and
the Kaggle and TCIA layouts (or a zip) give the same assignment. The stem is hashed with SHA-256
into a number u in [0, 1); u < train fraction goes to train, the next `validation` fraction to
validation, the rest to test. Because every file is assigned independently, each class is split in
the stated proportions up to sampling noise (stratified in expectation); a class of 8 images may
well have 0 or 2 test images. Folds for k-fold cross-validation use a second, independent hash.

Splits are image-level: the dataset publishes no patient id, so images of one patient can sit in
different splits (as in Matek et al. 2021 and every published result on this dataset).
"""

from __future__ import annotations

import hashlib
import posixpath

SPLITS = ("train", "validation", "test")
# Fractions of train / validation / test. Changing them changes the prepared dataset's splits.
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def file_stem(file_name: str) -> str:
  """'BLA/0001-1000/BLA_00001.jpg' -> 'BLA_00001' (upper-cased, so '.JPG' and '.jpg' agree)."""
  return posixpath.splitext(posixpath.basename(file_name.replace("\\", "/")))[0].upper()


def _unit_hash(text: str) -> float:
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(file_name: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
  """The split ('train', 'validation' or 'test') of one file, from its stem alone."""
  if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
    raise ValueError(
        f"Split fractions must be three non-negative numbers summing to 1: {fractions}")
  u = _unit_hash("split:" + file_stem(file_name))
  if u < fractions[0]:
    return "train"
  if u < fractions[0] + fractions[1]:
    return "validation"
  return "test"


def fold_of(file_name: str, num_folds: int) -> int:
  """The cross-validation fold (0 .. num_folds-1) of one file, from its stem alone."""
  if num_folds < 2:
    raise ValueError(f"num_folds must be at least 2, got {num_folds}")
  return int(_unit_hash("fold:" + file_stem(file_name)) * num_folds)
