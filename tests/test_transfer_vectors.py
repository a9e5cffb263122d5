"""transfers.json checked independently (SPEC §17): the file's hash with hashlib, each
plaintext rebuilt with cbor2, each envelope opened by bob, and the refusals."""

from __future__ import annotations

import hashlib

import cbor2
import pytest
from test_vectors import _check_envelope

from proto import Identity, decode_envelope
from proto.envelope import Kind
from proto.errors import ProtocolError
from proto.transfers import Chunk, Manifest
from proto.vectors import load

VECTORS = load("transfers")
KEYS = {k["name"]: k for k in load("keys")["keys"]}
H = bytes.fromhex


def test_the_manifest_names_the_file_by_size_and_blake2b_256() -> None:
    data = H(VECTORS["file"])
    fields = VECTORS["manifest"]["fields"]
    assert fields["hash"] == VECTORS["file_hash"] == hashlib.blake2b(data,
                                                                      digest_size=32).hexdigest()
    assert fields["size"] == len(data)
    assert fields["chunk_count"] == -(-len(data) // fields["chunk_size"])
    encoded = cbor2.dumps([H(fields["transfer_id"]), fields["size"], H(fields["hash"]),
                           fields["chunk_size"], fields["chunk_count"], fields["name"],
                           fields["media_type"]], canonical=True)
    assert encoded.hex() == VECTORS["manifest"]["encoded"]
    assert Manifest.decode(encoded).name == fields["name"]


def test_the_chunks_are_the_file_in_order() -> None:
    data = b""
    for index, entry in enumerate(VECTORS["chunks"]):
        fields = entry["fields"]
        assert fields["index"] == index
        assert fields["transfer_id"] == VECTORS["manifest"]["fields"]["transfer_id"]
        encoded = cbor2.dumps([H(fields["transfer_id"]), index, H(fields["data"])],
                              canonical=True)
        assert encoded.hex() == entry["encoded"]
        manifest = Manifest.decode(H(VECTORS["manifest"]["encoded"]))
        manifest.check_chunk(Chunk.decode(encoded))
        data += H(fields["data"])
    assert data == H(VECTORS["file"])


@pytest.mark.parametrize("entry", [VECTORS["manifest"], *VECTORS["chunks"]],
                         ids=lambda entry: entry["envelope"]["name"])
def test_each_envelope_is_sealed_as_specified_and_opens_to_its_plaintext(entry: dict) -> None:
    vector = entry["envelope"]
    _check_envelope(vector, {})
    bob = Identity(H(KEYS["bob"]["seed"]))
    contents = decode_envelope(H(vector["encoded"])).open(bob)
    expected_kind = Kind.TRANSFER_MANIFEST if vector["name"] == "manifest" \
        else Kind.TRANSFER_CHUNK
    assert (contents.kind, contents.plaintext.hex()) == (expected_kind, entry["encoded"])


@pytest.mark.parametrize("entry", VECTORS["invalid"], ids=lambda entry: entry["name"])
def test_each_invalid_plaintext_is_refused_with_its_code(entry: dict) -> None:
    with pytest.raises(ProtocolError) as refused:
        if entry["check"] == "manifest":
            Manifest.decode(H(entry["hex"]))
        else:
            Manifest.decode(H(VECTORS["manifest"]["encoded"])).check_chunk(
                Chunk.decode(H(entry["hex"])))
    assert refused.value.code.name == entry["error"]
