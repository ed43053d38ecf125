from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scheme(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEME_UNSPECIFIED: _ClassVar[Scheme]
    SCHEME_BFV: _ClassVar[Scheme]

class PayloadKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYLOAD_KIND_UNSPECIFIED: _ClassVar[PayloadKind]
    PAYLOAD_KIND_CLIENT_UPDATE: _ClassVar[PayloadKind]
    PAYLOAD_KIND_AGGREGATE: _ClassVar[PayloadKind]
SCHEME_UNSPECIFIED: Scheme
SCHEME_BFV: Scheme
PAYLOAD_KIND_UNSPECIFIED: PayloadKind
PAYLOAD_KIND_CLIENT_UPDATE: PayloadKind
PAYLOAD_KIND_AGGREGATE: PayloadKind

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class EncryptedHeader(_message.Message):
    __slots__ = ("version", "scheme", "kind", "key_fingerprint", "server_round", "layout", "scale_bits", "normaliser", "num_examples", "num_summands", "num_values", "slots_per_ciphertext", "ciphertexts_per_chunk", "chunk_sha256")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SERVER_ROUND_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SCALE_BITS_FIELD_NUMBER: _ClassVar[int]
    NORMALISER_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_SUMMANDS_FIELD_NUMBER: _ClassVar[int]
    NUM_VALUES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_PER_CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    version: int
    scheme: Scheme
    kind: PayloadKind
    key_fingerprint: bytes
    server_round: int
    layout: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    scale_bits: int
    normaliser: int
    num_examples: int
    num_summands: int
    num_values: int
    slots_per_ciphertext: int
    ciphertexts_per_chunk: int
    chunk_sha256: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, version: _Optional[int] = ..., scheme: _Optional[_Union[Scheme, str]] = ..., kind: _Optional[_Union[PayloadKind, str]] = ..., key_fingerprint: _Optional[bytes] = ..., server_round: _Optional[int] = ..., layout: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., scale_bits: _Optional[int] = ..., normaliser: _Optional[int] = ..., num_examples: _Optional[int] = ..., num_summands: _Optional[int] = ..., num_values: _Optional[int] = ..., slots_per_ciphertext: _Optional[int] = ..., ciphertexts_per_chunk: _Optional[int] = ..., chunk_sha256: _Optional[_Iterable[bytes]] = ...) -> None: ...

class CiphertextChunk(_message.Message):
    __slots__ = ("index", "ciphertexts")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, index: _Optional[int] = ..., ciphertexts: _Optional[_Iterable[bytes]] = ...) -> None: ...
