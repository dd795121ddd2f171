from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Probe(_message.Message):
    __slots__ = ("name", "ok", "detail", "fix")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    FIX_FIELD_NUMBER: _ClassVar[int]
    name: str
    ok: bool
    detail: str
    fix: str
    def __init__(self, name: _Optional[str] = ..., ok: bool = ..., detail: _Optional[str] = ..., fix: _Optional[str] = ...) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("version", "storage", "probes", "inspector")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    INSPECTOR_FIELD_NUMBER: _ClassVar[int]
    version: str
    storage: str
    probes: _containers.RepeatedCompositeFieldContainer[Probe]
    inspector: str
    def __init__(self, version: _Optional[str] = ..., storage: _Optional[str] = ..., probes: _Optional[_Iterable[_Union[Probe, _Mapping]]] = ..., inspector: _Optional[str] = ...) -> None: ...

class CreateEpisodeRequest(_message.Message):
    __slots__ = ("image", "policy", "labels", "memory_mib", "pids", "cpus")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    image: str
    policy: str
    labels: _containers.ScalarMap[str, str]
    memory_mib: int
    pids: int
    cpus: float
    def __init__(self, image: _Optional[str] = ..., policy: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., memory_mib: _Optional[int] = ..., pids: _Optional[int] = ..., cpus: _Optional[float] = ...) -> None: ...

class EpisodeInfo(_message.Message):
    __slots__ = ("id", "image", "policy", "status", "turn", "forked_from", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    FORKED_FROM_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: str
    policy: str
    status: str
    turn: int
    forked_from: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., image: _Optional[str] = ..., policy: _Optional[str] = ..., status: _Optional[str] = ..., turn: _Optional[int] = ..., forked_from: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("episode", "command", "timeout_ms", "env", "cwd", "stdin", "max_output_bytes")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    episode: str
    command: str
    timeout_ms: int
    env: _containers.ScalarMap[str, str]
    cwd: str
    stdin: bytes
    max_output_bytes: int
    def __init__(self, episode: _Optional[str] = ..., command: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., env: _Optional[_Mapping[str, str]] = ..., cwd: _Optional[str] = ..., stdin: _Optional[bytes] = ..., max_output_bytes: _Optional[int] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("turn", "stdout", "stderr", "stdout_truncated", "stderr_truncated", "exit_code", "duration_ms", "cwd", "verdict", "reasons", "node", "timed_out", "accepted_us")
    TURN_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    STDOUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    STDERR_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_US_FIELD_NUMBER: _ClassVar[int]
    turn: int
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    exit_code: int
    duration_ms: int
    cwd: str
    verdict: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    node: int
    timed_out: bool
    accepted_us: int
    def __init__(self, turn: _Optional[int] = ..., stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., stdout_truncated: bool = ..., stderr_truncated: bool = ..., exit_code: _Optional[int] = ..., duration_ms: _Optional[int] = ..., cwd: _Optional[str] = ..., verdict: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., node: _Optional[int] = ..., timed_out: bool = ..., accepted_us: _Optional[int] = ...) -> None: ...

class StepEvent(_message.Message):
    __slots__ = ("stdout", "stderr", "result")
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    stdout: bytes
    stderr: bytes
    result: StepResponse
    def __init__(self, stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., result: _Optional[_Union[StepResponse, _Mapping]] = ...) -> None: ...

class WriteFileRequest(_message.Message):
    __slots__ = ("episode", "path", "data", "mode")
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    episode: str
    path: str
    data: bytes
    mode: int
    def __init__(self, episode: _Optional[str] = ..., path: _Optional[str] = ..., data: _Optional[bytes] = ..., mode: _Optional[int] = ...) -> None: ...

class ReadFileRequest(_message.Message):
    __slots__ = ("episode", "path", "max_bytes")
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    episode: str
    path: str
    max_bytes: int
    def __init__(self, episode: _Optional[str] = ..., path: _Optional[str] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class ReadFileResponse(_message.Message):
    __slots__ = ("data", "size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    size: int
    def __init__(self, data: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class DeleteEpisodeRequest(_message.Message):
    __slots__ = ("episode",)
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    episode: str
    def __init__(self, episode: _Optional[str] = ...) -> None: ...

class DeleteEpisodeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForkRequest(_message.Message):
    __slots__ = ("episode", "turn", "count", "keep_warm")
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    KEEP_WARM_FIELD_NUMBER: _ClassVar[int]
    episode: str
    turn: int
    count: int
    keep_warm: int
    def __init__(self, episode: _Optional[str] = ..., turn: _Optional[int] = ..., count: _Optional[int] = ..., keep_warm: _Optional[int] = ...) -> None: ...

class ForkResponse(_message.Message):
    __slots__ = ("episodes", "warm")
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    WARM_FIELD_NUMBER: _ClassVar[int]
    episodes: _containers.RepeatedScalarFieldContainer[str]
    warm: int
    def __init__(self, episodes: _Optional[_Iterable[str]] = ..., warm: _Optional[int] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("episode", "turn", "count")
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    episode: str
    turn: int
    count: int
    def __init__(self, episode: _Optional[str] = ..., turn: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class PrepareResponse(_message.Message):
    __slots__ = ("ready", "memory_bytes", "warm_bytes", "evicted")
    READY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    WARM_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    ready: int
    memory_bytes: int
    warm_bytes: int
    evicted: int
    def __init__(self, ready: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., warm_bytes: _Optional[int] = ..., evicted: _Optional[int] = ...) -> None: ...

class RewindRequest(_message.Message):
    __slots__ = ("episode", "turn")
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    episode: str
    turn: int
    def __init__(self, episode: _Optional[str] = ..., turn: _Optional[int] = ...) -> None: ...

class RewindResponse(_message.Message):
    __slots__ = ("turn",)
    TURN_FIELD_NUMBER: _ClassVar[int]
    turn: int
    def __init__(self, turn: _Optional[int] = ...) -> None: ...

class TreeRequest(_message.Message):
    __slots__ = ("episode", "whole", "outputs")
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    WHOLE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    episode: str
    whole: bool
    outputs: bool
    def __init__(self, episode: _Optional[str] = ..., whole: bool = ..., outputs: bool = ...) -> None: ...

class TurnInfo(_message.Message):
    __slots__ = ("turn", "action", "exit_code", "verdict", "reasons", "node", "kind", "bytes", "state", "cwd", "image_bytes", "image_dumped_bytes", "image_parent", "record", "parent_record", "episodes", "forks", "stdout", "stderr", "duration_ms", "stdout_truncated", "stderr_truncated")
    TURN_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DUMPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PARENT_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    PARENT_RECORD_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    FORKS_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    STDOUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    STDERR_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    turn: int
    action: str
    exit_code: int
    verdict: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    node: int
    kind: str
    bytes: int
    state: str
    cwd: str
    image_bytes: int
    image_dumped_bytes: int
    image_parent: int
    record: int
    parent_record: int
    episodes: _containers.RepeatedScalarFieldContainer[str]
    forks: _containers.RepeatedScalarFieldContainer[str]
    stdout: bytes
    stderr: bytes
    duration_ms: int
    stdout_truncated: bool
    stderr_truncated: bool
    def __init__(self, turn: _Optional[int] = ..., action: _Optional[str] = ..., exit_code: _Optional[int] = ..., verdict: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., node: _Optional[int] = ..., kind: _Optional[str] = ..., bytes: _Optional[int] = ..., state: _Optional[str] = ..., cwd: _Optional[str] = ..., image_bytes: _Optional[int] = ..., image_dumped_bytes: _Optional[int] = ..., image_parent: _Optional[int] = ..., record: _Optional[int] = ..., parent_record: _Optional[int] = ..., episodes: _Optional[_Iterable[str]] = ..., forks: _Optional[_Iterable[str]] = ..., stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., duration_ms: _Optional[int] = ..., stdout_truncated: bool = ..., stderr_truncated: bool = ...) -> None: ...

class TreeResponse(_message.Message):
    __slots__ = ("episode", "turns", "family", "family_root", "family_episodes")
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ROOT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_EPISODES_FIELD_NUMBER: _ClassVar[int]
    episode: EpisodeInfo
    turns: _containers.RepeatedCompositeFieldContainer[TurnInfo]
    family: _containers.RepeatedCompositeFieldContainer[TurnInfo]
    family_root: str
    family_episodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, episode: _Optional[_Union[EpisodeInfo, _Mapping]] = ..., turns: _Optional[_Iterable[_Union[TurnInfo, _Mapping]]] = ..., family: _Optional[_Iterable[_Union[TurnInfo, _Mapping]]] = ..., family_root: _Optional[str] = ..., family_episodes: _Optional[_Iterable[str]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("reset_timings", "price_page_dedup")
    RESET_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PRICE_PAGE_DEDUP_FIELD_NUMBER: _ClassVar[int]
    reset_timings: bool
    price_page_dedup: bool
    def __init__(self, reset_timings: bool = ..., price_page_dedup: bool = ...) -> None: ...

class EpisodeStats(_message.Message):
    __slots__ = ("id", "policy", "status", "turn", "checkpoint_bytes", "nodes_fs", "nodes_full", "turns_shared", "image_bytes", "image_dumped_bytes", "page_dedup_saved_bytes", "memory_bytes", "fs_verdicts_refuted")
    ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    NODES_FS_FIELD_NUMBER: _ClassVar[int]
    NODES_FULL_FIELD_NUMBER: _ClassVar[int]
    TURNS_SHARED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DUMPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGE_DEDUP_SAVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FS_VERDICTS_REFUTED_FIELD_NUMBER: _ClassVar[int]
    id: str
    policy: str
    status: str
    turn: int
    checkpoint_bytes: int
    nodes_fs: int
    nodes_full: int
    turns_shared: int
    image_bytes: int
    image_dumped_bytes: int
    page_dedup_saved_bytes: int
    memory_bytes: int
    fs_verdicts_refuted: int
    def __init__(self, id: _Optional[str] = ..., policy: _Optional[str] = ..., status: _Optional[str] = ..., turn: _Optional[int] = ..., checkpoint_bytes: _Optional[int] = ..., nodes_fs: _Optional[int] = ..., nodes_full: _Optional[int] = ..., turns_shared: _Optional[int] = ..., image_bytes: _Optional[int] = ..., image_dumped_bytes: _Optional[int] = ..., page_dedup_saved_bytes: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., fs_verdicts_refuted: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("checkpoint_bytes", "episodes", "nodes_fs", "nodes_full", "turns_shared", "per_episode", "dump_ms_p50", "dump_ms_p99", "snapshot_ms_p50", "snapshot_ms_p99", "restore_ms_p50", "restore_ms_p99", "checkpoint_ms_p50", "checkpoint_ms_p99", "inspector", "inspector_loaded", "bpf_map_bytes", "verdicts_checked", "verdicts_unsafe", "verdicts_fs_without_change", "watched_sandboxes", "sandbox_map_bytes", "dedup_ms_p50", "dedup_ms_p99", "image_bytes", "image_dumped_bytes", "scheduler", "checkpoint_slots", "checkpoints_promoted", "checkpoint_batches", "checkpoints_batched", "queue_wait_ms_p50", "queue_wait_ms_p99", "queue_wait_ms_max", "sandbox_memory_bytes", "warm_copies", "warm_memory_bytes", "warm_hits", "warm_misses", "warm_evicted", "criu_restore_ms_p50", "criu_restore_ms_p99", "ksm_saved_bytes", "fs_verdicts_refuted")
    CHECKPOINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    NODES_FS_FIELD_NUMBER: _ClassVar[int]
    NODES_FULL_FIELD_NUMBER: _ClassVar[int]
    TURNS_SHARED_FIELD_NUMBER: _ClassVar[int]
    PER_EPISODE_FIELD_NUMBER: _ClassVar[int]
    DUMP_MS_P50_FIELD_NUMBER: _ClassVar[int]
    DUMP_MS_P99_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_MS_P50_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_MS_P99_FIELD_NUMBER: _ClassVar[int]
    RESTORE_MS_P50_FIELD_NUMBER: _ClassVar[int]
    RESTORE_MS_P99_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_MS_P50_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_MS_P99_FIELD_NUMBER: _ClassVar[int]
    INSPECTOR_FIELD_NUMBER: _ClassVar[int]
    INSPECTOR_LOADED_FIELD_NUMBER: _ClassVar[int]
    BPF_MAP_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_UNSAFE_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FS_WITHOUT_CHANGE_FIELD_NUMBER: _ClassVar[int]
    WATCHED_SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_MAP_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEDUP_MS_P50_FIELD_NUMBER: _ClassVar[int]
    DEDUP_MS_P99_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DUMPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SLOTS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_PROMOTED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_BATCHES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_BATCHED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_MS_P50_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_MS_P99_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_MS_MAX_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    WARM_COPIES_FIELD_NUMBER: _ClassVar[int]
    WARM_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    WARM_HITS_FIELD_NUMBER: _ClassVar[int]
    WARM_MISSES_FIELD_NUMBER: _ClassVar[int]
    WARM_EVICTED_FIELD_NUMBER: _ClassVar[int]
    CRIU_RESTORE_MS_P50_FIELD_NUMBER: _ClassVar[int]
    CRIU_RESTORE_MS_P99_FIELD_NUMBER: _ClassVar[int]
    KSM_SAVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FS_VERDICTS_REFUTED_FIELD_NUMBER: _ClassVar[int]
    checkpoint_bytes: int
    episodes: int
    nodes_fs: int
    nodes_full: int
    turns_shared: int
    per_episode: _containers.RepeatedCompositeFieldContainer[EpisodeStats]
    dump_ms_p50: float
    dump_ms_p99: float
    snapshot_ms_p50: float
    snapshot_ms_p99: float
    restore_ms_p50: float
    restore_ms_p99: float
    checkpoint_ms_p50: float
    checkpoint_ms_p99: float
    inspector: str
    inspector_loaded: bool
    bpf_map_bytes: int
    verdicts_checked: int
    verdicts_unsafe: int
    verdicts_fs_without_change: int
    watched_sandboxes: int
    sandbox_map_bytes: int
    dedup_ms_p50: float
    dedup_ms_p99: float
    image_bytes: int
    image_dumped_bytes: int
    scheduler: str
    checkpoint_slots: int
    checkpoints_promoted: int
    checkpoint_batches: int
    checkpoints_batched: int
    queue_wait_ms_p50: float
    queue_wait_ms_p99: float
    queue_wait_ms_max: float
    sandbox_memory_bytes: int
    warm_copies: int
    warm_memory_bytes: int
    warm_hits: int
    warm_misses: int
    warm_evicted: int
    criu_restore_ms_p50: float
    criu_restore_ms_p99: float
    ksm_saved_bytes: int
    fs_verdicts_refuted: int
    def __init__(self, checkpoint_bytes: _Optional[int] = ..., episodes: _Optional[int] = ..., nodes_fs: _Optional[int] = ..., nodes_full: _Optional[int] = ..., turns_shared: _Optional[int] = ..., per_episode: _Optional[_Iterable[_Union[EpisodeStats, _Mapping]]] = ..., dump_ms_p50: _Optional[float] = ..., dump_ms_p99: _Optional[float] = ..., snapshot_ms_p50: _Optional[float] = ..., snapshot_ms_p99: _Optional[float] = ..., restore_ms_p50: _Optional[float] = ..., restore_ms_p99: _Optional[float] = ..., checkpoint_ms_p50: _Optional[float] = ..., checkpoint_ms_p99: _Optional[float] = ..., inspector: _Optional[str] = ..., inspector_loaded: bool = ..., bpf_map_bytes: _Optional[int] = ..., verdicts_checked: _Optional[int] = ..., verdicts_unsafe: _Optional[int] = ..., verdicts_fs_without_change: _Optional[int] = ..., watched_sandboxes: _Optional[int] = ..., sandbox_map_bytes: _Optional[int] = ..., dedup_ms_p50: _Optional[float] = ..., dedup_ms_p99: _Optional[float] = ..., image_bytes: _Optional[int] = ..., image_dumped_bytes: _Optional[int] = ..., scheduler: _Optional[str] = ..., checkpoint_slots: _Optional[int] = ..., checkpoints_promoted: _Optional[int] = ..., checkpoint_batches: _Optional[int] = ..., checkpoints_batched: _Optional[int] = ..., queue_wait_ms_p50: _Optional[float] = ..., queue_wait_ms_p99: _Optional[float] = ..., queue_wait_ms_max: _Optional[float] = ..., sandbox_memory_bytes: _Optional[int] = ..., warm_copies: _Optional[int] = ..., warm_memory_bytes: _Optional[int] = ..., warm_hits: _Optional[int] = ..., warm_misses: _Optional[int] = ..., warm_evicted: _Optional[int] = ..., criu_restore_ms_p50: _Optional[float] = ..., criu_restore_ms_p99: _Optional[float] = ..., ksm_saved_bytes: _Optional[int] = ..., fs_verdicts_refuted: _Optional[int] = ...) -> None: ...

class ListEpisodesRequest(_message.Message):
    __slots__ = ("labels", "status")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    status: str
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ..., status: _Optional[str] = ...) -> None: ...

class ListEpisodesResponse(_message.Message):
    __slots__ = ("episodes",)
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    episodes: _containers.RepeatedCompositeFieldContainer[EpisodeInfo]
    def __init__(self, episodes: _Optional[_Iterable[_Union[EpisodeInfo, _Mapping]]] = ...) -> None: ...

class BuildImageRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ImportImageRequest(_message.Message):
    __slots__ = ("name", "path", "allow_setuid")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ALLOW_SETUID_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    allow_setuid: bool
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., allow_setuid: bool = ...) -> None: ...

class ImageProgress(_message.Message):
    __slots__ = ("message", "done")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    message: str
    done: bool
    def __init__(self, message: _Optional[str] = ..., done: bool = ...) -> None: ...

class ListImagesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListImagesResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, images: _Optional[_Iterable[str]] = ...) -> None: ...

class ExportNodeRequest(_message.Message):
    __slots__ = ("episode", "turn")
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    episode: str
    turn: int
    def __init__(self, episode: _Optional[str] = ..., turn: _Optional[int] = ...) -> None: ...

class NodeChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ImportNodeResponse(_message.Message):
    __slots__ = ("episode", "turn", "kind", "bundle_bytes", "verify_ms", "build_ms", "restore_ms")
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_FIELD_NUMBER: _ClassVar[int]
    BUILD_MS_FIELD_NUMBER: _ClassVar[int]
    RESTORE_MS_FIELD_NUMBER: _ClassVar[int]
    episode: EpisodeInfo
    turn: int
    kind: str
    bundle_bytes: int
    verify_ms: int
    build_ms: int
    restore_ms: int
    def __init__(self, episode: _Optional[_Union[EpisodeInfo, _Mapping]] = ..., turn: _Optional[int] = ..., kind: _Optional[str] = ..., bundle_bytes: _Optional[int] = ..., verify_ms: _Optional[int] = ..., build_ms: _Optional[int] = ..., restore_ms: _Optional[int] = ...) -> None: ...
