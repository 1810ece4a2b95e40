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


class Selection:
  """Which files of the prepared dataset a run uses for one role (train, validation or test).

  Without folds, each role is the prepared split of the same name and nothing is filtered. With
  k-fold cross-validation (fold i of k, as in Matek et al. 2021's 5-fold protocol), the role is
  drawn from all prepared files: test is fold i; validation is the files of the other folds that
  `split_of` puts in 'validation' (about 10%); train is the rest. Picklable (grain workers).
  """

  def __init__(self, role: str, fold: int | None = None, num_folds: int | None = None):
    if role not in SPLITS:
      raise ValueError(f"role must be one of {SPLITS}, got {role!r}")
    if (fold is None) != (num_folds is None):
      raise ValueError("Set both data.fold and data.num_folds, or neither.")
    if num_folds is not None and not (num_folds >= 2 and 0 <= fold < num_folds):
      raise ValueError(f"data.fold={fold} must be in 0..num_folds-1 and num_folds={num_folds} "
                       ">= 2.")
    self.role = role
    self.fold = fold
    self.num_folds = num_folds

  @property
  def uses_folds(self) -> bool:
    return self.num_folds is not None

  def splits(self) -> tuple[str, ...]:
    """The prepared splits this role reads."""
    return SPLITS if self.uses_folds else (self.role,)

  def keep(self, file_names, labels=None):
    """bool [N]: which of the records (file names and dataset labels) of the role's splits it uses.

    A function of the whole set of names, so that a selection can be stratified by class.
    """
    import numpy as np  # noqa: PLC0415

    return np.fromiter((self(str(name)) for name in file_names), bool, len(file_names))

  def __call__(self, file_name: str) -> bool:
    if not self.uses_folds:
      return True
    in_fold = fold_of(file_name, self.num_folds) == self.fold
    if self.role == "test":
      return in_fold
    is_validation = split_of(file_name) == "validation"
    return not in_fold and (is_validation if self.role == "validation" else not is_validation)
