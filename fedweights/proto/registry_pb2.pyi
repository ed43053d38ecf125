import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class TensorEntry(_message.Message):
    __slots__ = ("name", "dtype", "shape", "sha256", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    sha256: str
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class PrivacyCertificate(_message.Message):
    __slots__ = ("guarantee", "record_epsilon", "record_delta", "user_epsilon", "user_delta", "accountant", "dp_enabled", "he_enabled", "settings", "statement", "source")
    class Guarantee(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        GUARANTEE_UNSPECIFIED: _ClassVar[PrivacyCertificate.Guarantee]
        UNKNOWN: _ClassVar[PrivacyCertificate.Guarantee]
        NONE: _ClassVar[PrivacyCertificate.Guarantee]
        DIFFERENTIAL_PRIVACY: _ClassVar[PrivacyCertificate.Guarantee]
    GUARANTEE_UNSPECIFIED: PrivacyCertificate.Guarantee
    UNKNOWN: PrivacyCertificate.Guarantee
    NONE: PrivacyCertificate.Guarantee
    DIFFERENTIAL_PRIVACY: PrivacyCertificate.Guarantee
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GUARANTEE_FIELD_NUMBER: _ClassVar[int]
    RECORD_EPSILON_FIELD_NUMBER: _ClassVar[int]
    RECORD_DELTA_FIELD_NUMBER: _ClassVar[int]
    USER_EPSILON_FIELD_NUMBER: _ClassVar[int]
    USER_DELTA_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    DP_ENABLED_FIELD_NUMBER: _ClassVar[int]
    HE_ENABLED_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    guarantee: PrivacyCertificate.Guarantee
    record_epsilon: float
    record_delta: float
    user_epsilon: float
    user_delta: float
    accountant: str
    dp_enabled: bool
    he_enabled: bool
    settings: _containers.ScalarMap[str, str]
    statement: str
    source: str
    def __init__(self, guarantee: _Optional[_Union[PrivacyCertificate.Guarantee, str]] = ..., record_epsilon: _Optional[float] = ..., record_delta: _Optional[float] = ..., user_epsilon: _Optional[float] = ..., user_delta: _Optional[float] = ..., accountant: _Optional[str] = ..., dp_enabled: _Optional[bool] = ..., he_enabled: _Optional[bool] = ..., settings: _Optional[_Mapping[str, str]] = ..., statement: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class WeightManifest(_message.Message):
    __slots__ = ("name", "version", "sha256", "size_bytes", "tensors", "parent", "parent_digest", "tags", "created_at", "run_id", "round", "privacy", "publisher")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PARENT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    sha256: str
    size_bytes: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    parent: ModelRef
    parent_digest: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    created_at: _timestamp_pb2.Timestamp
    run_id: str
    round: int
    privacy: PrivacyCertificate
    publisher: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., parent: _Optional[_Union[ModelRef, _Mapping]] = ..., parent_digest: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., privacy: _Optional[_Union[PrivacyCertificate, _Mapping]] = ..., publisher: _Optional[str] = ...) -> None: ...

class ManifestRecord(_message.Message):
    __slots__ = ("manifest", "digest")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    manifest: bytes
    digest: str
    def __init__(self, manifest: _Optional[bytes] = ..., digest: _Optional[str] = ...) -> None: ...

class PublishHeader(_message.Message):
    __slots__ = ("name", "tags", "parent", "run_id", "round", "privacy", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    parent: ModelRef
    run_id: str
    round: int
    privacy: PrivacyCertificate
    sha256: str
    def __init__(self, name: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., parent: _Optional[_Union[ModelRef, _Mapping]] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., privacy: _Optional[_Union[PrivacyCertificate, _Mapping]] = ..., sha256: _Optional[str] = ...) -> None: ...

class PublishTrailer(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: PublishHeader
    chunk: bytes
    trailer: PublishTrailer
    def __init__(self, header: _Optional[_Union[PublishHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ..., trailer: _Optional[_Union[PublishTrailer, _Mapping]] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("record", "deduplicated")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    record: ManifestRecord
    deduplicated: bool
    def __init__(self, record: _Optional[_Union[ManifestRecord, _Mapping]] = ..., deduplicated: _Optional[bool] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("ref", "chunk_size")
    REF_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ref: str
    chunk_size: int
    def __init__(self, ref: _Optional[str] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("record", "chunk")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    record: ManifestRecord
    chunk: bytes
    def __init__(self, record: _Optional[_Union[ManifestRecord, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "versions", "latest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: int
    latest: ManifestRecord
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[int] = ..., latest: _Optional[_Union[ManifestRecord, _Mapping]] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class LogRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class LogResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[ManifestRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[ManifestRecord, _Mapping]]] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: ManifestRecord
    def __init__(self, record: _Optional[_Union[ManifestRecord, _Mapping]] = ...) -> None: ...

class CheckAccessRequest(_message.Message):
    __slots__ = ("write",)
    WRITE_FIELD_NUMBER: _ClassVar[int]
    write: bool
    def __init__(self, write: _Optional[bool] = ...) -> None: ...

class CheckAccessResponse(_message.Message):
    __slots__ = ("identity",)
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    identity: str
    def __init__(self, identity: _Optional[str] = ...) -> None: ...
