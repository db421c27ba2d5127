"""DFT forces of phonopy's own examples replayed through ``run_phonon`` (relaxation off): the workflow
with NAC must give phonopy's own NAC frequencies (Gamma LO/TO, band path, DOS) on the same inputs."""

import numpy as np
import phonopy
import pytest
from ase.calculators.calculator import Calculator, all_changes
from ase.io import read
from phonopy.file_IO import parse_FORCE_SETS

from conftest import shared_path
from workflows.nac import gamma_lo_to
from workflows.phonon import run_phonon


class ReplayCalculator(Calculator):
    """Returns the recorded DFT forces of the one displaced atom; zero forces for the perfect supercell
    (and for the unit cell, from which run_phonon takes the perfect supercell's forces)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, ideal_positions, cell, dataset):
        super().__init__()
        self.ideal, self.cell, self.dataset = np.asarray(ideal_positions), np.asarray(cell), dataset
        self.calls = 0

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.calls += 1
        if len(self.atoms) != len(self.ideal):  # the unit cell, for the perfect supercell's forces: at rest
            n = len(self.atoms)
            self.results = {"energy": 0.0, "free_energy": 0.0, "forces": np.zeros((n, 3)), "stress": np.zeros(6)}
            return
        frac = np.linalg.solve(self.cell.T, (self.atoms.positions - self.ideal).T).T
        disp = (frac - np.round(frac)) @ self.cell
        moved = np.flatnonzero(np.linalg.norm(disp, axis=1) > 1e-7)
        forces = np.zeros((len(self.atoms), 3))
        if len(moved) == 1:
            matches = [d for d in self.dataset["first_atoms"]
                       if d["number"] == moved[0] and np.allclose(d["displacement"], disp[moved[0]], atol=1e-7)]
            assert len(matches) == 1, f"no recorded displacement {disp[moved[0]]} of atom {moved[0]}"
            forces = np.array(matches[0]["forces"])
        else:
            assert len(moved) == 0, "more than one atom displaced"
        self.results = {"energy": 0.0, "free_energy": 0.0, "forces": forces, "stress": np.zeros(6)}


def _replay_case(folder, dim, primitive, tmp_path, method):
    unitcell = read(folder / "POSCAR-unitcell", format="vasp")
    reference = phonopy.load(
        supercell_matrix=dim, primitive_matrix=primitive, unitcell_filename=str(folder / "POSCAR-unitcell"),
        force_sets_filename=str(folder / "FORCE_SETS"), born_filename=str(folder / "BORN"),
    )
    reference.nac_params = {**reference.nac_params, "method": method}
    sc = reference.supercell
    dataset = parse_FORCE_SETS(natom=len(sc), filename=str(folder / "FORCE_SETS"))
    calc = ReplayCalculator(sc.positions, sc.cell, dataset)
    result = run_phonon(
        unitcell, calc, relax=False, supercell=dim, primitive=primitive, displacement=0.01, mesh=(8, 8, 8),
        nac=True, born_file=folder / "BORN", nac_method=method, output_dir=tmp_path, progress=False,
    )
    return result, reference


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["gonze", "wang"])
@pytest.mark.parametrize(
    "case",
    [("phonopy-examples/NaCl", (2, 2, 2), "auto"), ("phonopy-examples/MgO", (2, 2, 2), "auto"),
     ("phonondb/entries/mp-8062-20180417", (2, 2, 2), "auto")],
)
def test_replayed_dft_forces_reproduce_phonopy_nac(case, method, tmp_path):
    folder = shared_path("data", *case[0].split("/"))
    result, reference = _replay_case(folder, case[1], case[2], tmp_path, method)
    ours = result.phonopy
    assert len(ours.supercell) == len(reference.supercell)
    # ours were symmetrised and made charge-neutral explicitly (phonopy does the same internally)
    np.testing.assert_allclose(ours.nac_params["born"].sum(axis=0), 0.0, atol=1e-12)
    # Gamma approached along [100], [110], [111]: LO and TO
    lo_ours, lo_ref = gamma_lo_to(ours), gamma_lo_to(reference)
    for a, b in zip(lo_ours["directions"], lo_ref["directions"]):
        np.testing.assert_allclose(a["frequencies"][3:], b["frequencies"][3:], atol=1e-6)
        assert a["lo_frequencies"] == pytest.approx(b["lo_frequencies"], abs=1e-6)
    assert result.summary["nac"] is not None
    # DFT force constants hold the whole dipole-dipole interaction: phonopy's plain NAC, nothing added
    assert result.summary["nac"]["dipole_tail"]["scheme"].startswith("none")
    # band path and mesh DOS
    q = np.array([[0.1, 0.0, 0.0], [0.25, 0.25, 0.0], [0.5, 0.5, 0.5], [0.3, 0.1, 0.05]])
    ours.run_qpoints(q)
    reference.run_qpoints(q)
    np.testing.assert_allclose(ours.qpoints.frequencies, reference.qpoints.frequencies, atol=1e-6)
    for ph in (ours, reference):
        ph.run_mesh([8, 8, 8], is_gamma_center=True)
        ph.run_total_dos(freq_min=-1, freq_max=30, freq_pitch=0.1)
    np.testing.assert_allclose(ours.total_dos.dos, reference.total_dos.dos, atol=1e-6)
