"""The 21 morphological classes of the Matek et al. (Blood 2021) bone-marrow dataset.

Codes, names and full-set image counts are from Matek 2021, Table 1. The order of `CLASSES` is the
label order of the TFDS builder (alphabetical by code) and must never change: prepared datasets and
checkpoints depend on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class CellClass:
  """One morphological class: its code, its name and its image count in the full dataset."""

  code: str
  name: str
  count: int


CLASSES: tuple[CellClass, ...] = (
    CellClass("ABE", "Abnormal eosinophil", 8),
    CellClass("ART", "Artefact", 19_630),
    CellClass("BAS", "Basophil", 441),
    CellClass("BLA", "Blast", 11_973),
    CellClass("EBO", "Erythroblast", 27_395),
    CellClass("EOS", "Eosinophil", 5_883),
    CellClass("FGC", "Faggot cell", 47),
    CellClass("HAC", "Hairy cell", 409),
    CellClass("KSC", "Smudge cell", 42),
    CellClass("LYI", "Immature lymphocyte", 65),
    CellClass("LYT", "Lymphocyte", 26_242),
    CellClass("MMZ", "Metamyelocyte", 3_055),
    CellClass("MON", "Monocyte", 4_040),
    CellClass("MYB", "Myelocyte", 6_557),
    CellClass("NGB", "Band neutrophil", 9_968),
    CellClass("NGS", "Segmented neutrophil", 29_424),
    CellClass("NIF", "Not identifiable", 3_538),
    CellClass("OTH", "Other cell", 294),
    CellClass("PEB", "Proerythroblast", 2_740),
    CellClass("PLM", "Plasma cell", 7_629),
    CellClass("PMO", "Promyelocyte", 11_994),
)

CODES: tuple[str, ...] = tuple(c.code for c in CLASSES)
NAMES: dict[str, str] = {c.code: c.name for c in CLASSES}
FULL_COUNTS: dict[str, int] = {c.code: c.count for c in CLASSES}
NUM_CLASSES = len(CLASSES)
TOTAL_IMAGES = sum(FULL_COUNTS.values())  # 171,374

# Classes with fewer than 1,000 images have no range folder: their files sit in the class folder.
FLAT_CLASSES: tuple[str, ...] = tuple(c.code for c in CLASSES if c.count < 1000)


def validate_codes(codes: Sequence[str]) -> tuple[str, ...]:
  """Returns `codes` as a tuple; raises ValueError naming any unknown or repeated code."""
  codes = tuple(codes)
  unknown = [c for c in codes if c not in NAMES]
  if unknown:
    raise ValueError(
        f"Unknown class code(s) {unknown}. Valid codes are: {', '.join(CODES)}."
    )
  repeated = sorted({c for c in codes if codes.count(c) > 1})
  if repeated:
    raise ValueError(f"Class code(s) {repeated} are listed more than once.")
  if not codes:
    raise ValueError(f"The class list is empty. Valid codes are: {', '.join(CODES)}.")
  return codes
