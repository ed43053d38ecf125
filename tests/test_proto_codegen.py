"""The committed generated code in fedweights/proto/ matches what protos/ generates now."""

from __future__ import annotations

import filecmp
import importlib.util
import sys

from .conftest import REPO


def test_generated_code_is_up_to_date(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "tools" / "gen_proto.py")
    gen_proto = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = gen_proto
    spec.loader.exec_module(gen_proto)
    gen_proto.generate(tmp_path)
    committed = REPO / "fedweights" / "proto"
    fresh = sorted(p.name for p in tmp_path.iterdir())
    existing = sorted(p.name for p in committed.iterdir() if p.is_file())
    assert fresh == existing, "run `make proto` and commit fedweights/proto/"
    match, mismatch, errors = filecmp.cmpfiles(tmp_path, committed, fresh, shallow=False)
    assert not mismatch and not errors, f"stale generated code {mismatch + errors}: run `make proto` and commit"
    protos = sorted((REPO / "protos" / "fedweights" / "v1").glob("*.proto"))
    for proto in protos:  # every .proto has generated code that imports
        importlib.import_module(f"fedweights.proto.{proto.stem}_pb2")
