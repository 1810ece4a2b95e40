"""Split protocols: stratified train / validation / test, stratified k-fold, DinoBloom's test list.

Stratified by rank: within each class, files are ordered by a SHA-256 hash of their stem
(`BLA_00001`: the file name without folders or extension) and cut by rank at rounded cumulative
fractions, so each class gets its share to within one image, and the assignment is a pure function
of the set of file names (the same for the Kaggle and TCIA layouts and for a zip). Splits are
image-level: the dataset publishes no patient id, so one patient's cells can sit on both sides.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import importlib.resources
import itertools
import logging
import math
import posixpath
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

SPLITS = ("train", "validation", "test")
# Fractions of train / validation / test. Changing them changes the prepared dataset's splits.
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
PROTOCOLS = ("stratified", "dinobloom")
# k-fold and DinoBloom: validation is this stratified share of the files outside the test set.
VALIDATION_FRACTION = Fraction(1, 10)
# DinoBloom's bone-marrow test split (see splits_data/README.md for its source and licence).
DINOBLOOM_TEST_FILE = "dinobloom_bm_test.txt"


def file_stem(file_name: str) -> str:
  """'BLA/0001-1000/BLA_00001.jpg' -> 'BLA_00001' (upper-cased, so '.JPG' and '.jpg' agree)."""
  return posixpath.splitext(posixpath.basename(file_name.replace("\\", "/")))[0].upper()


def _cumulative(fractions: Sequence[float | Fraction]) -> list[Fraction]:
  """Exact cumulative fractions (floats read as the decimals they print as), the last exactly 1."""
  exact = [f if isinstance(f, Fraction | int) else Fraction(str(f)) for f in fractions]
  if not exact or any(f < 0 for f in exact) or abs(sum(exact) - 1) > Fraction(1, 10**9):
    raise ValueError(f"Split fractions must be non-negative numbers summing to 1: {fractions}")
  cumulative = list(itertools.accumulate(exact))
  cumulative[-1] = Fraction(1)
  return cumulative


def _assign_by_rank(file_names: Sequence[str], codes: Sequence, fractions, salt: str) -> np.ndarray:
  """int [N]: the part (0 .. len(fractions)-1) of every file.

  Within each class (files with the same code), files are ranked 0 .. n-1 by SHA-256 of
  `salt:stem` (ties, i.e. repeated stems, by stem then input order). Part j takes ranks
  [c(j-1), c(j)) with c(j) = floor(n * (f_1 + ... + f_j) + 1/2), computed exactly: every cut is
  within 1/2 image of its exact value, so every part is within one image of n * f_j.
  """
  codes = codes.tolist() if isinstance(codes, np.ndarray) else list(codes)
  stems = [file_stem(str(name)) for name in file_names]
  if len(codes) != len(stems):
    raise ValueError(f"Got {len(stems)} file names but {len(codes)} class codes.")
  cumulative = _cumulative(fractions)
  members = collections.defaultdict(list)
  for i, code in enumerate(codes):
    members[code].append(i)
  parts = np.empty(len(stems), np.int64)
  for indices in members.values():
    keys = {i: hashlib.sha256(f"{salt}:{stems[i]}".encode()).digest() for i in indices}
    indices.sort(key=lambda i: (keys[i], stems[i]))
    cuts = [math.floor(len(indices) * c + Fraction(1, 2)) for c in cumulative]
    part = 0
    for rank, i in enumerate(indices):
      while rank >= cuts[part]:
        part += 1
      parts[i] = part
  return parts


def assign_splits(file_names: Sequence[str], codes: Sequence,
                  fractions: Sequence[float | Fraction] = DEFAULT_FRACTIONS) -> list[str]:
  """The split ('train', 'validation' or 'test') of every file, stratified by class.

  `codes`: the class of each file (a code such as 'BLA' or a dataset label). Each class gets
  within one image of its share of each split (rounding rule: `_assign_by_rank`).
  """
  if len(fractions) != 3:
    raise ValueError(f"Split fractions must be three numbers (train, validation, test): "
                     f"{fractions}")
  return [SPLITS[p] for p in _assign_by_rank(file_names, codes, fractions, "split")]


def assign_folds(file_names: Sequence[str], codes: Sequence, num_folds: int) -> list[int]:
  """The cross-validation fold (0 .. num_folds-1) of every file, stratified by class.

  Every class of n images has floor(n/k) or ceil(n/k) images in each fold, so a class with at
  least k images is in every fold. Ordered by a hash independent of `assign_splits`'s.
  """
  if not isinstance(num_folds, int) or num_folds < 2:
    raise ValueError(f"num_folds must be an integer of at least 2, got {num_folds}")
  return _assign_by_rank(file_names, codes, [Fraction(1, num_folds)] * num_folds, "fold").tolist()


@functools.cache
def dinobloom_test_stems() -> frozenset[str]:
  """The 34,266 file stems of DinoBloom's bone-marrow test split (shipped with bmcc)."""
  text = (importlib.resources.files("bmcc.data") / "splits_data" / DINOBLOOM_TEST_FILE).read_text(
      encoding="utf-8")
  return frozenset(line.strip().upper() for line in text.splitlines() if line.strip())


class Selection:
  """Which files of the prepared dataset a run uses for one role (train, validation or test).

  protocol 'stratified' without folds: each role is the prepared split of the same name, unread.
  With k folds (fold i of k, Matek et al. 2021's protocol): test is fold i (`assign_folds`).
  protocol 'dinobloom': test is the files on DinoBloom's list. In both, validation is a stratified
  `VALIDATION_FRACTION` of the other files and train the rest. Picklable (grain workers).
  """

  def __init__(self, role: str, fold: int | None = None, num_folds: int | None = None,
               protocol: str = "stratified"):
    if role not in SPLITS:
      raise ValueError(f"role must be one of {SPLITS}, got {role!r}")
    if protocol not in PROTOCOLS:
      raise ValueError(f"config.data.split={protocol!r}: use one of {', '.join(PROTOCOLS)}.")
    if protocol == "dinobloom" and (fold is not None or num_folds is not None):
      raise ValueError("config.data.split='dinobloom' has a fixed test set: unset data.fold and "
                       "data.num_folds (k-fold cross-validation uses split='stratified').")
    if (fold is None) != (num_folds is None):
      raise ValueError("Set both data.fold and data.num_folds, or neither.")
    if num_folds is not None and not (num_folds >= 2 and 0 <= fold < num_folds):
      raise ValueError(f"data.fold={fold} must be in 0..num_folds-1 and num_folds={num_folds} "
                       ">= 2.")
    self.role = role
    self.fold = fold
    self.num_folds = num_folds
    self.protocol = protocol

  @property
  def filters(self) -> bool:
    """Whether the role must read the record index and call `keep` (k-fold and dinobloom)."""
    return self.num_folds is not None or self.protocol == "dinobloom"

  def splits(self) -> tuple[str, ...]:
    """The prepared splits this role reads."""
    return SPLITS if self.filters else (self.role,)

  def roles(self, file_names: Sequence[str], labels: Sequence) -> np.ndarray:
    """str [N]: the role of every record of `splits()` (file names and dataset labels)."""
    names = [str(name) for name in file_names]
    codes = np.asarray(labels).tolist()
    if self.protocol == "dinobloom":
      listed = dinobloom_test_stems()
      is_test = np.array([file_stem(name) in listed for name in names], bool)
    elif self.num_folds is not None:
      is_test = np.asarray(assign_folds(names, codes, self.num_folds), np.int64) == self.fold
    else:
      return np.full(len(names), self.role)
    roles = np.full(len(names), "test", dtype="<U10")
    rest = np.flatnonzero(~is_test)
    roles[rest] = assign_splits([names[i] for i in rest], [codes[i] for i in rest],
                                (1 - VALIDATION_FRACTION, VALIDATION_FRACTION, 0))
    return roles

  def keep(self, file_names: Sequence[str], labels: Sequence) -> np.ndarray:
    """bool [N]: which of ALL records of the role's splits it uses (a function of the whole set).

    For the train role, logs how the protocol divides the records.
    """
    roles = self.roles(file_names, labels)
    if self.role == "train" and self.filters:
      counts = {s: int((roles == s).sum()) for s in SPLITS}
      logging.info("Protocol %s: %s.", self._name(),
                   ", ".join(f"{n} {s}" for s, n in counts.items()))
      missing = self.describe(file_names).get("dinobloom_missing")
      if missing:
        logging.warning("%d files of DinoBloom's test list are not in the prepared dataset "
                        "(missing from the download, or excluded as known bad).", missing)
    return roles == self.role

  def _name(self) -> str:
    """'stratified 80/10/10', 'stratified fold 2 of 5' or 'dinobloom'."""
    if self.protocol == "dinobloom":
      return "dinobloom (DinoBloom's test list; validation 10% of the rest)"
    if self.num_folds is not None:
      return f"stratified fold {self.fold} of {self.num_folds}"
    return "stratified " + "/".join(f"{round(f * 100)}" for f in DEFAULT_FRACTIONS)

  def describe(self, file_names: Sequence[str] | None = None) -> dict:
    """What a test report records about the protocol.

    protocol, fold, num_folds; for 'dinobloom' with the record index's `file_names`, also
    `dinobloom_listed` (stems on the list), `dinobloom_missing` (how many of them are not among
    the records: absent from the download, or excluded as known bad) and up to 20 of their stems
    (`dinobloom_missing_files`).
    """
    described = {"protocol": self.protocol, "fold": self.fold, "num_folds": self.num_folds}
    if self.protocol == "dinobloom" and file_names is not None:
      listed = dinobloom_test_stems()
      missing = sorted(listed - {file_stem(str(name)) for name in file_names})
      described.update(dinobloom_listed=len(listed), dinobloom_missing=len(missing),
                       dinobloom_missing_files=missing[:20])
    return described
