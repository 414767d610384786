"""The node's settings: one YAML file, validated by pydantic v2.

Every default lives here and nowhere else. Unknown keys are errors (``extra="forbid"``), so a
misspelt key in an admin's YAML fails loudly with its path instead of being silently ignored.
Settings are passed down from :mod:`dicomnode.app`; nothing reads them from a global.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.datadict import dictionary_VR, tag_for_keyword

from dicomnode import resources

__all__ = [
    "AllowedPeer",
    "CompletionPolicy",
    "ConfigError",
    "Destination",
    "MatchCondition",
    "Rule",
    "Settings",
    "load_settings",
]

AE_TITLE = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[ -~]*[!-~][ -~]*$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigError(ValueError):
    """A settings file that cannot be used; the message names the key and the reason."""


class AllowedPeer(_Model):
    """One peer allowed to open associations (AE title and, optionally, its host)."""

    ae_title: AE_TITLE = Field(description="Calling AE title of the peer.")
    host: str | None = Field(
        default=None, description="IP address the peer connects from; any host when omitted."
    )


class TLSFiles(_Model):
    """This side's certificate and key, and the CA certificates it trusts (PEM files)."""

    certificate: Path = Field(description="PEM certificate (chain) presented to peers.")
    private_key: Path = Field(description="PEM private key of the certificate (unencrypted).")
    ca_certificates: Path = Field(description="PEM bundle of the CAs whose peers are trusted.")

    @field_validator("certificate", "private_key", "ca_certificates")
    @classmethod
    def _readable(cls, path: Path) -> Path:
        if not path.is_file():
            raise ValueError(f"no such file: {path}")
        return path


class NodeTLS(TLSFiles):
    """DICOM TLS on the receiver (BCP 195 profile, TLS 1.2+)."""

    require_client_certificate: bool = Field(
        default=True, description="Mutual authentication: a peer without a certificate from "
        "ca_certificates is refused (and audited).")
    port: int | None = Field(
        default=None, ge=1, le=65535, description="null: node.port speaks TLS only. A port: TLS "
        "there, and plain DICOM stays on node.port (for sites that need both).")


class NodeSettings(_Model):
    """The DICOM application entity this node presents."""

    ae_title: AE_TITLE = Field(default="DICOMNODE", description="Called AE title of this node.")
    host: str = Field(
        default="127.0.0.1",
        description="Address to listen on. 127.0.0.1 accepts only local peers; use 0.0.0.0 "
        "to accept the hospital network.",
    )
    port: int = Field(default=11112, ge=1, le=65535, description="TCP port to listen on.")
    receive_processes: int | Literal["auto"] = Field(
        default="auto",
        description="Receiving processes accepting on the node's listening socket, so that "
        "parallel associations do not share one interpreter lock; 'auto': one per core, at "
        "least 4 and at most 16.",
    )

    @field_validator("receive_processes")
    @classmethod
    def _processes_in_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("receive_processes must be 1-64 or 'auto'")
        return value

    @property
    def receive_process_count(self) -> int:
        """``receive_processes`` resolved for this machine."""
        if self.receive_processes == "auto":
            # 4 associations on 2 cores: 3.85 s with 2 processes, 3.3 s with 4 or 8
            # (docs/benchmarks.md, "Ingest")
            return min(max(os.cpu_count() or 1, 4), 16)
        return int(self.receive_processes)

    max_pdu: int = Field(default=0, ge=0, description="Maximum PDU size offered; 0 = unlimited.")
    event_driven: bool = Field(
        default=True, description="Event-driven association threads and the C-STORE fast path "
        "(dicomnode/dicom/reactor.py) instead of pynetdicom's 1 ms polling loops and message "
        "path; false: pynetdicom's own.")
    network_timeout_s: float = Field(default=60.0, gt=0, description="Idle network timeout.")
    allowed_peers: list[AllowedPeer] = Field(
        default_factory=list,
        description="Peers allowed to associate. Empty: any peer is accepted.",
    )
    ae_title_aliases: list[AE_TITLE] = Field(
        default_factory=list, description="Other called AE titles this node answers to; an "
        "association to any other title is rejected and audited.")
    tls: NodeTLS | None = Field(default=None, description="DICOM TLS; null: plain TCP only.")
    min_free_disk_mb: float = Field(
        default=1024.0, ge=0, description="Below this free space on var_dir's filesystem, new "
        "associations are refused (transient: senders retry) and /healthz reports unhealthy; "
        "0 turns the check off.")


class DatabaseSettings(_Model):
    """Where the audit trail and the job queue live."""

    url: str | None = Field(
        default=None,
        description="SQLAlchemy URL. Default: SQLite at <var_dir>/dicomnode.sqlite. Production: "
        "postgresql+psycopg://user@host/dbname",
    )
    auto_migrate: bool = Field(
        default=True, description="Apply pending migrations when the node starts."
    )


class CompletionPolicy(_Model):
    """When a series counts as complete."""

    quiet_period_s: float = Field(
        default=30.0, gt=0, description="Complete after this long without a new instance."
    )
    on_association_close: bool = Field(
        default=True,
        description="Complete as soon as every association that sent the series has closed "
        "and the content checks pass, without waiting for the quiet period.",
    )
    require_contiguous: bool = Field(
        default=True,
        description="Content check: axial image positions form one evenly spaced stack and "
        "the count matches ImagesInAcquisition / NumberOfSlices when the headers give it.",
    )
    max_wait_s: float = Field(
        default=600.0, gt=0, description="Complete (with the reason) at the latest this long after "
        "the first instance, whatever the checks say.",
    )


class MatchCondition(_Model):
    """One condition on a DICOM keyword: exactly one of the operators."""

    equals: str | float | None = None
    one_of: list[str | float] | None = None
    regex: str | None = None
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one_operator(self) -> MatchCondition:
        used = [k for k in ("equals", "one_of", "regex") if getattr(self, k) is not None]
        ranged = self.min is not None or self.max is not None
        if len(used) + int(ranged) != 1:
            raise ValueError("give exactly one of equals, one_of, regex, or min/max")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile: {exc}") from exc
        return self


class Rule(_Model):
    """A declarative routing rule: which complete series go to which pipelines and destinations."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    match: dict[str, MatchCondition] = Field(
        default_factory=dict,
        description="DICOM keyword -> condition; all must hold. Empty matches every series.",
    )
    calling_ae: list[str] = Field(
        default_factory=list, description="Only series sent by these AE titles; empty: any."
    )
    pipelines: list[str] = Field(default_factory=list, description="Pipelines to run.")
    models: dict[str, str] = Field(
        default_factory=dict, description="Pipeline -> model name (a directory under "
        "models/, see `dicomnode models list`) for pipelines that run a model.")
    destinations: list[str] = Field(
        default_factory=list,
        description="Destination names to send results to; 'CALLING_AE' sends back to the "
        "sender if it is also listed in destinations by AE title.",
    )
    completion: CompletionPolicy | None = Field(
        default=None, description="Overrides the default completion policy for this rule."
    )
    requires: dict[str, dict[str, MatchCondition]] = Field(
        default_factory=dict, description="A study rule: role -> conditions, e.g. {CT: "
        "{Modality: {equals: CT}}, PET: {Modality: {equals: PT}}}. One job per study runs "
        "once a complete series of the same StudyInstanceUID fills every role, in any order; "
        "the pipelines read the series by role. Replaces match.")
    study_max_wait_s: float = Field(
        default=3600.0, gt=0, description="A study rule: after this long with a role still "
        "empty the study is recorded INCOMPLETE, naming the missing roles (a late series "
        "still starts the job).")
    allow_frame_of_reference_mismatch: bool = Field(
        default=False, description="A study rule: run even when the series' Frames of "
        "Reference differ (only if the site registers them otherwise).")

    @field_validator("match")
    @classmethod
    def _known_keywords(cls, value: dict[str, MatchCondition]) -> dict[str, MatchCondition]:
        for keyword in value:
            if tag_for_keyword(keyword) is None:
                raise ValueError(f"{keyword!r} is not a DICOM keyword")
            if dictionary_VR(keyword) == "SQ":
                raise ValueError(f"{keyword!r} is a sequence; rules match single values")
        return value

    @field_validator("requires")
    @classmethod
    def _roles(cls, value: dict[str, dict[str, MatchCondition]]
               ) -> dict[str, dict[str, MatchCondition]]:
        for role, conditions in value.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,31}", role):
                raise ValueError(f"role {role!r}: letters, digits, _ or -, at most 32")
            if not conditions:
                raise ValueError(f"role {role!r} has no conditions: it would match any series")
            cls._known_keywords(conditions)
        return value

    @model_validator(mode="after")
    def _study_rule(self) -> Rule:
        if self.requires and self.match:
            raise ValueError("a study rule (requires) matches its series by role; move the "
                             "conditions of 'match' into each role of 'requires'")
        if self.requires and len(self.requires) < 2:
            raise ValueError("requires names at least two roles (one series is a plain rule)")
        return self


class Destination(_Model):
    """A DICOM peer results are pushed to."""

    ae_title: AE_TITLE
    host: str
    port: int = Field(ge=1, le=65535)
    seg_type: Literal["BINARY", "LABELMAP"] = Field(
        default="BINARY", description="SEG flavour; BINARY is read by most viewers."
    )
    tls: TLSFiles | None = Field(default=None, description="DICOM TLS to this peer (mutual "
                                 "authentication with this node's certificate); null: plain TCP.")


DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"  # executor.device and `dicomnode worker --device`


class CelerySettings(_Model):
    """The ``celery`` executor: RabbitMQ carries job ids to ``dicomnode worker`` processes on
    any machine that reaches the broker, the database and the shared storage."""

    broker_url: str = Field(default="amqp://guest:guest@127.0.0.1:5672//",
                            pattern=r"^amqps?://", description="RabbitMQ (amqp:// or amqps://); "
                            "not Redis, whose visibility timeout re-delivers long jobs.")
    queue: str = Field(default="dicomnode.jobs", min_length=1, max_length=200,
                       description="The queue of pipelines not named in queues.")
    queues: dict[str, str] = Field(
        default_factory=dict, description="Pipeline -> queue, e.g. GPU pipelines on a queue "
        "only GPU workers consume (dicomnode worker --queue).")
    delivery_limit: int = Field(
        default=20, ge=1, description="Quorum-queue deliveries of one message before it goes to "
        "the dead-letter queue <queue>.dead (a worker killed that often by one job).")


class ExecutorSettings(_Model):
    """How jobs are run."""

    kind: Literal["local", "celery"] = Field(
        default="local", description="local: worker processes of the node itself; celery: "
        "`dicomnode worker` processes anywhere, fed through RabbitMQ.")
    workers: int = Field(default=1, ge=0, le=64, description="Worker processes; 0 runs none.")
    device: str = Field(default="auto", pattern=DEVICE_PATTERN,
                        description="auto: CUDA when present, else the CPU; or cpu, cuda, cuda:N.")
    celery: CelerySettings = Field(default_factory=CelerySettings)
    lease_s: float = Field(default=300.0, gt=0, description="A worker's claim on a job expires "
                           "after this long without a heartbeat; the job is then re-queued.")
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_s: float = Field(default=30.0, gt=0, description="A failed job waits this "
                                   "long before its second attempt, doubling each time ...")
    retry_backoff_max_s: float = Field(default=600.0, gt=0, description="... up to this.")
    poll_interval_s: float = Field(default=0.5, gt=0)


class PushSettings(_Model):
    """Delivery of results: retries and backoff."""

    max_attempts: int = Field(default=30, ge=1, description="Attempts before a dead letter: "
                              "with the default backoff about 3.6 hours of PACS outage.")
    backoff_initial_s: float = Field(default=2.0, gt=0)
    backoff_max_s: float = Field(default=600.0, gt=0)
    batch_size: int = Field(default=500, ge=1, description="Instances per association.")


class ScheduleSettings(_Model):
    """Periodic sweeps (one APScheduler instance per node)."""

    completion_sweep_s: float = Field(default=0.5, gt=0)
    dispatch_sweep_s: float = Field(default=5.0, gt=0, description="Lease reclaim period.")
    delivery_sweep_s: float = Field(default=0.5, gt=0)


class HttpSettings(_Model):
    """The operations endpoint: ``/metrics`` (Prometheus), ``/healthz`` and the status page."""

    host: str = Field(default="127.0.0.1", description="Listen address; the status page shows "
                      "UIDs and can re-send dead letters: keep it local or behind a proxy.")
    port: int | None = Field(default=8080, ge=1, le=65535, description="null: no HTTP server.")


class RetentionSettings(_Model):
    """When received instances and written results are deleted from disk (rows stay: the audit
    trail keeps every UID, checksum and decision). Only finished work is ever deleted."""

    received_days: float | None = Field(
        default=7.0, ge=0, description="Delete a received series this many days after its last "
        "job and delivery finished (dead letters included); null: never.")
    outputs_days: float | None = Field(
        default=7.0, ge=0, description="Delete a job's results this many days after the job "
        "and every delivery of them finished; null: never. A dead letter can be re-sent only "
        "until then.")
    max_gb: float | None = Field(
        default=None, gt=0, description="Size cap for received instances plus results: above "
        "it, finished work is deleted oldest first whatever its age; null: no cap.")
    sweep_s: float = Field(default=3600.0, gt=0, description="How often the policy runs.")


class OutputSettings(_Model):
    """How results are labelled."""

    series_number_offset: int = Field(
        default=9000, ge=0, description="Result series numbers start here (+ each pipeline's own series_number)."
    )
    series_description_prefix: str = Field(default="AI ", max_length=20)
    previews: bool = Field(
        default=True, description="Write PNG previews (axial + coronal) next to each job's "
        "outputs, for a quick look without a viewer.")


class CtSrSettings(_Model):
    """SR4ZCT (``ct-sr``): network size and training budget per series."""

    iterations: int = Field(default=1000, ge=1, description="Training iterations per series: "
                            "the budget, the same on a busy or an idle machine.")
    max_train_seconds: float = Field(default=1800.0, gt=0, description="Safety stop only: "
                                     "when it cuts training short, the output says so.")
    width: int = Field(default=16, ge=4, le=256, description="Channels of the 2-D network.")
    depth: int = Field(default=6, ge=1, le=100, description="Dilated 3x3 layers (the paper "
                       "uses a 100-layer MS-D network).")
    patch: int = Field(default=64, ge=16, le=512)
    batch: int = Field(default=16, ge=1, le=512)
    target_thickness_mm: float | None = Field(
        default=None, gt=0, description="Output slice thickness; default the in-plane pixel "
        "size (isotropic voxels).")


class Settings(_Model):
    """Everything a node needs; the top level of the YAML file."""

    var_dir: Path = Field(
        default=Path("./var"),
        description="Spool, outputs and the default SQLite database live here (relative to the "
        "working directory).",
    )
    node: NodeSettings = Field(default_factory=NodeSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    completion: CompletionPolicy = Field(default_factory=CompletionPolicy)
    rules: list[Rule] = Field(default_factory=list)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)
    push: PushSettings = Field(default_factory=PushSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    ct_sr: CtSrSettings = Field(default_factory=CtSrSettings)
    models_dir: Path | None = Field(
        default=None, description="Model directories (manifests, MONAI bundles); default: the "
        "project's models/ folder.")

    @model_validator(mode="after")
    def _references_exist(self) -> Settings:
        names = set()
        for index, rule in enumerate(self.rules):
            if rule.name in names:
                raise ValueError(f"rules.{index}.name: duplicate rule name {rule.name!r}")
            names.add(rule.name)
            for dest in rule.destinations:
                if dest != "CALLING_AE" and dest not in self.destinations:
                    raise ValueError(
                        f"rules.{index}.destinations: {dest!r} is not a configured destination"
                    )
        return self

    # Derived locations (not settings of their own, so they cannot disagree).
    @property
    def spool_dir(self) -> Path:
        """Received instances: ``<var_dir>/spool/<study>/<series>/<sop>.dcm``."""
        return self.var_dir / "spool"

    @property
    def output_dir(self) -> Path:
        """Written results: ``<var_dir>/outputs/<job id>/``."""
        return self.var_dir / "outputs"

    @property
    def models_path(self) -> Path:
        """Where model directories are looked up."""
        return self.models_dir or resources.models_dir()

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL in force."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.var_dir / 'dicomnode.sqlite').resolve()}"

    def completion_for(self, rule_names: list[str]) -> CompletionPolicy:
        """The completion policy of the first named rule that overrides it, else the default."""
        for rule in self.rules:
            if rule.name in rule_names and rule.completion is not None:
                return rule.completion
        return self.completion


def _format_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<top level>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        lines.append(f"{path}: {msg}")
    return "\n".join(lines)


def parse_settings(data: Any, *, source: str = "<settings>") -> Settings:
    """Validate a mapping (the parsed YAML) into :class:`Settings`.

    Raises
    ------
    ConfigError
        With one line per problem, each naming the key path.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}:\n{_format_error(exc)}") from None


def load_settings(path: Path | str | None) -> Settings:
    """Read and validate a YAML settings file; ``None`` gives the embedded defaults.

    Parameters
    ----------
    path
        The YAML file, or ``None`` for ``config/dicomnode.yaml`` shipped with the project.

    Raises
    ------
    ConfigError
        The file is missing, is not YAML, or fails validation (naming the key).
    """
    if path is None:
        path = default_config_path()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_settings(data, source=str(path))


def default_config_path() -> Path:
    """The embedded default configuration, ``config/dicomnode.yaml`` as shipped."""
    return resources.shipped("config") / "dicomnode.yaml"


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the settings file, for editors."""
    return Settings.model_json_schema()
