"""Encrypted aggregation building blocks: keys, parameters, codec, envelope checks, streaming sum.

Everything here uses real TenSEAL/SEAL ciphertexts; no Flower processes.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import tenseal as ts
import torch

from fedweights.crypto.aggregate import EncryptedSum, RoundExpectation
from fedweights.crypto.codec import decrypt_envelope, encrypt_update, layout_of
from fedweights.crypto.envelope import EnvelopeError, chunk_key, load_envelope, save_envelope
from fedweights.crypto.keys import load_client_key, load_server_key, make_keys
from fedweights.crypto.params import HEParams
from fedweights.errors import UserError
from fedweights.proto import update_pb2 as pb

from .he_helpers import copy_record, model_states, replace_entry


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    files = make_keys(tmp_path_factory.mktemp("he") / "keys")
    return files, load_client_key(files.secret), load_server_key(files.server)


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory):
    files = make_keys(tmp_path_factory.mktemp("he-other") / "keys")
    return load_client_key(files.secret)


def test_key_files_secret_is_private_and_server_context_cannot_decrypt(keys):
    files, client, server = keys
    assert stat.S_IMODE(os.stat(files.secret).st_mode) == 0o600
    server_ctx = ts.context_from(files.server.read_bytes())
    assert not server_ctx.has_secret_key()
    assert ts.context_from(files.secret.read_bytes()).has_secret_key()
    # A real ciphertext made with the secret context cannot be decrypted with the server context.
    secret_ctx = ts.context_from(files.secret.read_bytes())
    vector = ts.bfv_vector(secret_ctx, [1, 2, 3])
    with pytest.raises(ValueError, match="secret"):
        ts.bfv_vector_from(server_ctx, vector.serialize()).decrypt()
    state = {"w": torch.ones(10)}
    envelope = encrypt_update(client, state, 1, 1, server_round=1)
    with pytest.raises(UserError, match="cannot decrypt"):
        decrypt_envelope(server, envelope)
    record = json.loads(files.params.read_text())
    assert record["key_fingerprint"] == client.fingerprint.hex() == server.fingerprint.hex()
    assert record["plain_modulus"] == 268369921 and record["max_summands"] == 93


def test_secret_and_server_keys_are_never_confused(keys, tmp_path):
    files, _, _ = keys
    with pytest.raises(UserError, match="holds the SECRET key"):
        load_server_key(files.secret)
    with pytest.raises(UserError, match="holds no secret key"):
        load_client_key(files.server)
    leaked = tmp_path / "secret.ctx"
    leaked.write_bytes(files.secret.read_bytes())
    leaked.chmod(0o644)
    with pytest.raises(UserError, match="chmod 600"):
        load_client_key(leaked)
    with pytest.raises(UserError, match="refusing to overwrite"):
        make_keys(files.secret.parent)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"coeff_mod_bit_sizes": (60, 60, 60, 60)}, "insecure parameters"),
        ({"coeff_mod_bit_sizes": (40,)}, "at least two primes"),
        ({"coeff_mod_bit_sizes": (30, 60)}, "noise room"),
        ({"poly_modulus_degree": 2048}, "unusable poly modulus degree"),
        ({"scale_bits": 27}, "unusable scale bits"),
        ({"plain_modulus_bits": 70}, "plain modulus bits"),
    ],
)
def test_insecure_or_unusable_parameters_are_refused_with_a_reason(kwargs, reason):
    with pytest.raises(UserError, match=reason):
        HEParams.create(**kwargs)


def test_weighted_average_round_trip_within_1e_6(keys):
    _, client, server = keys
    edge = float(np.nextafter(np.float32(client.params.max_abs_value), np.float32(0)))  # largest float32 in range
    states = [{k: v.clamp(-7.9, 7.9) for k, v in s.items()} for s in model_states(3, seed=1, scale=3.0)]
    for state in states:  # every client at the edges of the range: the sum is as large as it can be
        state["fc.weight"][0, :2] = torch.tensor([edge, -edge])
    counts = [120, 37, 451]
    normaliser = sum(counts)
    layout = layout_of(states[0])
    total = EncryptedSum(server, RoundExpectation(2, layout, normaliser))
    for state, n in zip(states, counts):
        assert total.add(encrypt_update(client, state, n, normaliser, server_round=2)) == n
    aggregate = total.result()
    header = pb.EncryptedHeader.FromString(aggregate["fedweights.he/header"].data)
    assert header.kind == pb.PAYLOAD_KIND_AGGREGATE and header.num_examples == normaliser and header.num_summands == 3

    decrypted = decrypt_envelope(client, aggregate, layout)
    for name in layout_names(layout):
        expected = sum(s[name].double() * n for s, n in zip(states, counts)) / normaliser
        error = (decrypted[name].double() - expected).abs().max().item()
        assert error <= 1e-6 and decrypted[name].dtype == torch.float32
    assert client.params.error_bound(3) < 1e-6


def layout_names(layout):
    return [t.name for t in layout]


def test_values_outside_the_encodable_range_are_refused_not_wrapped(keys):
    _, client, _ = keys
    state = {"a": torch.zeros(5), "b": torch.tensor([0.0, 9.0, 0.0])}
    with pytest.raises(UserError, match=r"weight b\[1\] = 9.0 is outside the encrypted range"):
        encrypt_update(client, state, 1, 1, server_round=1)
    with pytest.raises(UserError, match="outside the encrypted range"):
        encrypt_update(client, {"a": torch.tensor([float("nan")])}, 1, 1, server_round=1)
    with pytest.raises(UserError, match="weight normaliser"):
        encrypt_update(client, {"a": torch.zeros(3)}, 10, 5, server_round=1)
    with pytest.raises(UserError, match="floating-point"):
        encrypt_update(client, {"a": torch.zeros(3, dtype=torch.int64)}, 1, 1, server_round=1)


def test_server_refuses_updates_whose_sum_could_wrap_or_exceed_the_noise_budget(keys, tmp_path):
    _, client, server = keys
    state = {"w": torch.full((100,), 7.9)}
    layout = layout_of(state)
    total = EncryptedSum(server, RoundExpectation(1, layout, 10))
    total.add(encrypt_update(client, state, 6, 10, server_round=1))
    with pytest.raises(EnvelopeError, match="range: accepted updates would weigh 12 examples"):
        total.add(encrypt_update(client, state, 6, 10, server_round=1))
    assert total.num_summands == 1

    files = make_keys(tmp_path / "narrow", HEParams.create(plain_modulus_bits=33))  # noise room for 2 summands
    narrow_client, narrow_server = load_client_key(files.secret), load_server_key(files.server)
    assert narrow_server.params.max_summands == 2
    narrow = EncryptedSum(narrow_server, RoundExpectation(1, layout, 30))
    for _ in range(2):
        narrow.add(encrypt_update(narrow_client, state, 10, 30, server_round=1))
    with pytest.raises(EnvelopeError, match="noise budget: at most 2"):
        narrow.add(encrypt_update(narrow_client, state, 10, 30, server_round=1))


def _tamper_ciphertext(envelope):
    """A well-formed envelope (digests recomputed) whose first ciphertext is cut short."""
    import hashlib

    header = pb.EncryptedHeader.FromString(envelope["fedweights.he/header"].data)
    chunk = pb.CiphertextChunk.FromString(envelope[chunk_key(0)].data)
    chunk.ciphertexts[0] = chunk.ciphertexts[0][: len(chunk.ciphertexts[0]) // 2]
    data = chunk.SerializeToString()
    header.chunk_sha256[0] = hashlib.sha256(data).digest()
    tampered = replace_entry(envelope, chunk_key(0), data)
    return replace_entry(tampered, "fedweights.he/header", header.SerializeToString())


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("foreign key", "encrypted under another key"),
        ("wrong layout", "wrong layout"),
        ("wrong round", "update is for round 1, this is round 2"),
        ("truncated chunk", "corrupt chunk 0: SHA-256 does not match"),
        ("missing chunk", "truncated or padded payload"),
        ("flipped byte", "corrupt chunk 0: SHA-256 does not match"),
        ("corrupt ciphertext", "corrupt ciphertext"),
        ("oversize", "oversize update"),
        ("plaintext", "not an encrypted update"),
    ],
)
def test_each_bad_update_is_rejected_and_the_sum_stays_correct(keys, other_keys, case, reason):
    _, client, server = keys
    states = model_states(2, seed=3)
    layout = layout_of(states[0])
    good = encrypt_update(client, states[0], 5, 10, server_round=2)
    bad = {
        "foreign key": lambda: encrypt_update(other_keys, states[1], 5, 10, server_round=2),
        "wrong layout": lambda: encrypt_update(client, {"fc.weight": torch.zeros(3, 3)}, 5, 10, server_round=2),
        "wrong round": lambda: encrypt_update(client, states[1], 5, 10, server_round=1),
        "truncated chunk": lambda: replace_entry(good, chunk_key(0), good[chunk_key(0)].data[:-200]),
        "missing chunk": lambda: copy_record(good, drop=chunk_key(0)),
        "flipped byte": lambda: replace_entry(good, chunk_key(0), _flip(good[chunk_key(0)].data, 5000)),
        "corrupt ciphertext": lambda: _tamper_ciphertext(good),
        "oversize": lambda: replace_entry(good, chunk_key(0), bytes(4 * 2**20)),
        "plaintext": lambda: copy_record_from_state(states[1]),
    }[case]()
    total = EncryptedSum(server, RoundExpectation(2, layout, 10))
    with pytest.raises(EnvelopeError, match=reason):
        total.add(bad)
    assert total.num_summands == 0 and total.ciphertexts_held == 0  # the sum is untouched
    total.add(good)  # the round goes on with the good update
    decrypted = decrypt_envelope(client, total.result(), layout)
    assert (decrypted["fc.weight"] - states[0]["fc.weight"]).abs().max() < 1e-6


def copy_record_from_state(state):
    from flwr.app import ArrayRecord

    return ArrayRecord(state)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def test_sum_holds_one_model_whatever_the_number_of_clients(keys):
    _, client, server = keys
    state = model_states(1, seed=5)[0]
    layout = layout_of(state)
    update = encrypt_update(client, state, 1, 40, server_round=1)
    total = EncryptedSum(server, RoundExpectation(1, layout, 40))
    held = []
    for _ in range(6):
        total.add(update)
        held.append(total.ciphertexts_held)
    slots = client.params.poly_modulus_degree
    assert held == [-(-sum(t.size for t in layout) // slots)] * 6


STREAMING_PROBE = r"""
import sys, torch
from fedweights.crypto.aggregate import EncryptedSum, RoundExpectation
from fedweights.crypto.codec import encrypt_update, layout_of
from fedweights.crypto.keys import load_client_key, load_server_key
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024
client, server = load_client_key(sys.argv[1]), load_server_key(sys.argv[2])
state = {'w': torch.randn(400_000) * 0.1}
update = encrypt_update(client, state, 1, 100, 1)
total = EncryptedSum(server, RoundExpectation(1, layout_of(state), 100))
total.add(update); total.add(update)
after_two = hwm()
for _ in range(18): total.add(update)
print(hwm() - after_two)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_streaming_sum_memory_does_not_grow_with_clients(keys):
    """Adding 18 more updates of 400k values (≈6.4 MB each in memory) keeps peak memory flat."""
    files, _, _ = keys
    done = subprocess.run(
        [sys.executable, "-c", STREAMING_PROBE, str(files.secret), str(files.server)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    growth_mb = float(done.stdout.strip().splitlines()[-1])
    assert growth_mb < 30, f"peak memory grew by {growth_mb:.1f} MB over 18 more updates (O(clients) would be ~115 MB)"


def test_encrypted_model_file_round_trip(keys, tmp_path):
    _, client, server = keys
    state = model_states(1, seed=7)[0]
    total = EncryptedSum(server, RoundExpectation(1, layout_of(state), 3))
    total.add(encrypt_update(client, state, 3, 3, server_round=1))
    path = save_envelope(tmp_path / "model.he", total.result())
    decrypted = decrypt_envelope(client, load_envelope(path), layout_of(state))
    assert np.allclose(decrypted["fc.bias"].numpy(), state["fc.bias"].numpy(), atol=1e-6)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(EnvelopeError, match="truncated"):
        load_envelope(path)
