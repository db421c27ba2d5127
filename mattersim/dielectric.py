"""The shipped dielectric model ``mattersim-dielectric``: its data split, and where its files live.

The model predicts Born effective charges Z* and the electronic dielectric tensor eps_inf of any crystal;
it is an ensemble of multi-task models (:mod:`mattersim.multitask`, heads ``born_effective_charges`` and
``dielectric_tensor``) trained on the PhononDB BORN files (VASP PBEsol DFPT; A. Togo, CC BY 4.0). Its
files are in :data:`MODEL_DIR`: the training config ``train.yaml``, the split id lists, the members
``member_<k>.pth`` and ``card.json`` (metrics). The model card is ``docs/dielectric-model.md``.

**Split** (:func:`make_split`): by material, grouped by reduced formula so that no formula appears in two
splits (polymorphs stay together), seeded; 80 / 10 / 10 % of the formulas for train / validation / test.

**Metals and narrow-gap materials.** A few percent of the entries have eps_inf in the tens to thousands,
where Z* and eps_inf are ill-defined (DFPT of a (nearly) metallic band structure). Entries whose mean
eps_inf (trace / 3) exceeds :data:`METALLIC_EPSILON` are listed separately (``*_metallic.txt``): in
training they contribute only their eps_inf, through the logarithmic loss (the MAE of the matrix
logarithms), so that they neither dominate the loss nor are dropped; their Z* are not trained on. The
test metrics are reported for the materials with mean eps_inf <= 20 (the accuracy goal), for all
non-metallic ones, and for the metallic ones separately.

Rebuild the split (it is shipped; rebuilding with the same data and seed gives the same lists)::

    python -m mattersim.dielectric split ../shared/data/phonondb/entries

and train the members (one command each, ``MATTERSIM_PHONONDB`` names the entries folder)::

    MATTERSIM_PHONONDB=../shared/data/phonondb/entries \\
        mattersim train mattersim/pretrained/mattersim-dielectric/train.yaml --seed K -o runs/dielectric/member_K
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

from mattersim.errors import InputError

MODEL_NAME = "mattersim-dielectric"
MODEL_DIR = Path(__file__).resolve().parent / "pretrained" / MODEL_NAME
#: mean eps_inf above which an entry counts as metallic / narrow-gap (see the module docstring)
METALLIC_EPSILON = 50.0
SPLITS = ("train", "valid", "test")


def _born_epsilon(path: Path) -> np.ndarray:
    """eps_inf (3, 3) from a phonopy BORN file (first line: factor or comment; second: 9 numbers)."""
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line]
    for line in lines[:2]:
        parts = line.split()
        if len(parts) == 9:
            try:
                return np.array([float(x) for x in parts]).reshape(3, 3)
            except ValueError:
                break
    raise InputError(f"{path}: no line of 9 numbers (eps_inf) among the first two lines; the BORN file is damaged.")


def entry_table(entries_root: str | Path) -> list[dict]:
    """Every entry with a BORN file: id, reduced formula, mean eps_inf."""
    import ase.io
    from pymatgen.core import Composition

    root = Path(entries_root)
    if not root.is_dir():
        raise InputError(f"PhononDB entries folder '{root}' does not exist; give the folder holding <id>/BORN files.")
    rows = []
    for folder in sorted(p for p in root.iterdir() if (p / "BORN").is_file() and (p / "POSCAR-unitcell").is_file()):
        atoms = ase.io.read(folder / "POSCAR-unitcell", format="vasp")
        formula = Composition(atoms.get_chemical_formula()).reduced_formula
        eps = _born_epsilon(folder / "BORN")
        rows.append({"id": folder.name, "formula": formula, "epsilon_mean": float(np.trace(eps) / 3)})
    if not rows:
        raise InputError(f"'{root}' holds no PhononDB entries with POSCAR-unitcell and BORN.")
    return rows


def _split_of(formula: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """A formula's split from a seeded hash: stable, independent of the order or number of entries."""
    h = int(hashlib.sha256(f"{seed}:{formula}".encode()).hexdigest()[:12], 16) / 16**12
    if h < fractions[0]:
        return "train"
    return "valid" if h < fractions[0] + fractions[1] else "test"


def make_split(entries_root: str | Path, out_dir: str | Path = MODEL_DIR, *, seed: int = 0,
               fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, list[str]]:
    """Write ``<split>.txt`` and ``<split>_metallic.txt`` id lists into ``out_dir``; return them."""
    rows = entry_table(entries_root)
    lists: dict[str, list[str]] = {}
    for split in SPLITS:
        for suffix in ("", "_metallic"):
            lists[split + suffix] = []
    for row in rows:
        split = _split_of(row["formula"], seed, fractions)
        suffix = "_metallic" if row["epsilon_mean"] > METALLIC_EPSILON else ""
        lists[split + suffix].append(row["id"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, ids in lists.items():
        (out / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return lists


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "split":
        raise SystemExit("usage: python -m mattersim.dielectric split ENTRIES_DIR")
    lists = make_split(argv[1])
    for name, ids in lists.items():
        print(f"{name}: {len(ids)}")


if __name__ == "__main__":
    main()
