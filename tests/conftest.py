"""Shared test fixtures: the read-only ``../shared`` folder beside the repository, and a local stand-in for the
Materials Project's API (tests never use the network)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "mattersim_v1_reference"


def shared_path(*parts: str) -> Path:
    """A path under ../shared; skips the test with a clear reason when it is absent (a user's fresh clone)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the read-only ../shared data folder beside the repository), which is absent")
    return path


@pytest.fixture(scope="session")
def small_checkpoint() -> Path:
    return shared_path("fixtures", "mattersim_v1_reference", "m3gnet-small-random.pth")


@pytest.fixture(scope="session")
def checkpoint_1m() -> Path:
    return shared_path("fixtures", "mattersim_v1_reference", "m3gnet-1M-random.pth")


@pytest.fixture(scope="session")
def small_potential(small_checkpoint):
    from mattersim.potential import Potential

    return Potential.from_checkpoint(small_checkpoint, dtype="float64")


def assert_user_error(result, *fragments):
    """A CLI result with exit code 2 and one red 'Error: ...' line on stderr naming the fragments, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: small graphs run fastest so, and a busy 2-core machine is not
    oversubscribed. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mp_docs():
    from pymatgen.core import Lattice, Structure

    mgo = Structure(Lattice.cubic(4.21), ["Mg"] * 4 + ["O"] * 4,
                    [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
                     [0.5, 0.5, 0.5], [0, 0, 0.5], [0, 0.5, 0], [0.5, 0, 0]])
    mgo_b2 = Structure(Lattice.cubic(2.6), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    mg = Structure(Lattice.hexagonal(3.21, 5.21), ["Mg", "Mg"], [[1 / 3, 2 / 3, 0.25], [2 / 3, 1 / 3, 0.75]])
    o2 = Structure(Lattice.cubic(6.0), ["O", "O"], [[0, 0, 0], [0, 0, 0.2]])
    big = Structure(Lattice.cubic(12.0), ["Mg"] * 64, [[i / 4, j / 4, k / 4] for i in range(4) for j in range(4) for k in range(4)])
    cu = Structure(Lattice.cubic(3.61), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    au = Structure(Lattice.cubic(4.08), ["Au"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    cuau = Structure(Lattice.tetragonal(2.80, 3.67), ["Cu", "Au"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    docs = [("mp-1265", "MgO", mgo, 0.0), ("mp-1009129", "MgO", mgo_b2, 0.42), ("mp-153", "Mg", mg, 0.0),
            ("mp-12957", "O2", o2, 0.0), ("mp-99999", "Mg", big, 0.1), ("mp-30", "Cu", cu, 0.0),
            ("mp-81", "Au", au, 0.0), ("mp-522", "AuCu", cuau, 0.0)]
    return [{"material_id": m, "formula_pretty": f, "structure": s.as_dict(), "energy_above_hull": e,
             "chemsys": "-".join(sorted(s.composition.chemical_system.split("-")))} for m, f, s, e in docs]


@pytest.fixture
def fake_mp():
    """A local HTTP server that answers mp-api's heartbeat and summary queries with documents in the API's
    format (Mg-O and Cu-Au structures), filtering on chemsys and energy_above_hull as the API does, refusing
    any key but 32 x 'k' with 403; its requests are kept in ``server.requests``."""
    docs = _mp_docs()
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            requests.append((url.path, query, self.headers.get("x-api-key")))
            status = 200
            if url.path.startswith("/heartbeat"):
                body = {"version": "0.87.3", "db_version": "2025.09.25", "access_controlled_batch_ids": []}
            elif self.headers.get("x-api-key") != "k" * 32:
                status, body = 403, {"detail": "invalid API key"}
            else:
                systems = query.get("chemsys", "").split(",")
                out = [{k: v for k, v in d.items() if k != "chemsys"} for d in docs
                       if d["chemsys"] in systems and float(query.get("energy_above_hull_min", -1))
                       <= d["energy_above_hull"] <= float(query.get("energy_above_hull_max", 1e9))]
                body = {"data": out, "meta": {"total_doc": len(out), "max_limit": 1000}}
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.requests = requests
    server.url = f"http://127.0.0.1:{server.server_address[1]}/"
    yield server
    server.shutdown()
