"""Records of the customization pipeline: bases, files, feature sets, jobs and adapters.

Every record a user owns has an OpenAI-style public id as its primary key (``file-…``,
``ftjob-…``, ``ftevent-…``, ``ftckpt-…``); an adapter is addressed by its model name
``ft:<base>:<owner>:<suffix>:<job id>``. Artifact paths are stored relative to DATA_DIR
and set only after the artifact is completely written. Writes go through services.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

from webapp.core.models import ClaimedModel, TimeStampedModel, public_id_field


class BaseModel(TimeStampedModel):
    """A frozen base LLM the platform can extract features from and serve."""

    class SourceType(models.TextChoices):
        FOLDER = "folder", "local HF folder"
        GGUF = "gguf", "GGUF file"
        HUB = "hub", "HF hub id"
        BUNDLED = "bundled", "bundled SmolLM2"

    name = models.CharField(max_length=128, unique=True)
    source_type = models.CharField(max_length=16, choices=SourceType.choices)
    source = models.CharField(max_length=1024, help_text="Where it came from (id, file, folder).")
    path = models.CharField(max_length=1024, help_text="The prepared HF folder workers load.")
    revision = models.CharField(max_length=128, blank=True)
    fingerprint = models.JSONField(default=dict, blank=True)
    fingerprint_key = models.CharField(max_length=64, blank=True, db_index=True)
    enabled = models.BooleanField(default=True)
    is_default = models.BooleanField(default=False)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["is_default"], condition=Q(is_default=True), name="one_default_base"
            )
        ]

    def __str__(self) -> str:
        return self.name


class File(TimeStampedModel):
    """An uploaded dataset: stored under DATA_DIR/files/<id>.jsonl, never under its name."""

    class Status(models.TextChoices):
        UPLOADED = "uploaded"
        PROCESSED = "processed"  # validated and usable
        ERROR = "error"  # validation found problems (see report)

    id = public_id_field("file")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    purpose = models.CharField(max_length=32, default="fine-tune")
    filename = models.CharField(max_length=255, help_text="As uploaded; display only.")
    bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, db_index=True)
    format = models.CharField(max_length=32, blank=True)
    n_lines = models.IntegerField(default=0)
    n_examples = models.IntegerField(default=0)
    n_tokens = models.BigIntegerField(null=True, blank=True)
    max_example_tokens = models.IntegerField(null=True, blank=True)
    report = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.UPLOADED)
    path = models.CharField(max_length=512, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.id} ({self.filename})"

    @property
    def problems(self) -> list[dict[str, object]]:
        return list(self.report.get("problems", []))


class FeatureSet(TimeStampedModel):
    """Cached hidden states of one base over one dataset split, content-addressed by key."""

    class Status(models.TextChoices):
        PENDING = "pending"
        READY = "ready"
        FAILED = "failed"

    key = models.CharField(max_length=64, unique=True)
    base = models.ForeignKey(BaseModel, on_delete=models.CASCADE, related_name="feature_sets")
    dataset_sha256 = models.CharField(max_length=160)
    config = models.JSONField(default=dict, blank=True)
    path = models.CharField(max_length=512, blank=True)
    bytes = models.BigIntegerField(default=0)
    n_examples = models.IntegerField(default=0)
    n_tokens = models.BigIntegerField(default=0)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.key


class FineTuningJob(ClaimedModel):
    """One customization: validate -> extract (embed queue) -> train (train queue)."""

    class Status(models.TextChoices):
        VALIDATING_FILES = "validating_files"
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    class Stage(models.TextChoices):
        NONE = "", "—"
        EXTRACTING = "extracting"
        TRAINING = "training"

    id = public_id_field("ftjob")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    base = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="jobs")
    training_file = models.ForeignKey(
        File, on_delete=models.SET_NULL, null=True, related_name="training_jobs"
    )
    validation_file = models.ForeignKey(
        File, on_delete=models.SET_NULL, null=True, blank=True, related_name="validation_jobs"
    )
    hyperparameters = models.JSONField(default=dict, blank=True)
    # The adapter kind (docs/architecture.md, "Two adapter kinds") and its shape: ``carry_on``
    # holds a carry-on's config, ``tail`` a tail's (depth, rank, ...); ``preset`` names the
    # preset it came from.
    kind = models.CharField(max_length=16, default="carry_on")
    preset = models.CharField(max_length=16, blank=True)
    carry_on = models.JSONField(default=dict, blank=True)
    tail = models.JSONField(default=dict, blank=True)
    seed = models.BigIntegerField(default=0)
    # A continued fine-tune (``model`` was one of the owner's adapters): it trains the same
    # kind and shape on the same base, starting from the parent's weights. The name stays
    # when the parent is deleted (what the API shows as ``model``).
    parent = models.ForeignKey(
        "Adapter", on_delete=models.SET_NULL, null=True, blank=True, related_name="child_jobs"
    )
    parent_model = models.CharField(max_length=255, blank=True)
    suffix = models.CharField(max_length=64, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    status = models.CharField(
        max_length=20, choices=Status.choices, default=Status.VALIDATING_FILES, db_index=True
    )
    # While queued: the stage its enqueued task will run; while running: the running stage.
    stage = models.CharField(max_length=16, choices=Stage.choices, default="", blank=True)
    progress = models.FloatField(default=0.0)
    trained_tokens = models.BigIntegerField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    train_features = models.ForeignKey(
        FeatureSet, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    valid_features = models.ForeignKey(
        FeatureSet, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    # Times the waiting stage was sent again with no worker taking it (reset by a claim).
    requeues = models.IntegerField(default=0)

    TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "-created_at"])]

    @property
    def fine_tuned_model(self) -> str | None:
        adapter = getattr(self, "adapter", None)
        return adapter.name if adapter is not None else None

    @property
    def model_name(self) -> str:
        """``ft:<base>:<owner>:<suffix>:<job id>``, the name of the adapter the job trains."""
        owner = "".join(c if c.isalnum() or c in "-_." else "-" for c in self.owner.username)[:40]
        return f"ft:{self.base.name}:{owner}:{self.suffix}:{self.id}"


class JobEvent(models.Model):
    """A line in a job's log: a message, or metrics (step, epoch, losses, tokens/s)."""

    class Level(models.TextChoices):
        INFO = "info"
        WARN = "warn"
        ERROR = "error"

    class Type(models.TextChoices):
        MESSAGE = "message"
        METRICS = "metrics"

    id = public_id_field("ftevent")
    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="events")
    level = models.CharField(max_length=8, choices=Level.choices, default=Level.INFO)
    type = models.CharField(max_length=8, choices=Type.choices, default=Type.MESSAGE)
    message = models.TextField()
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    seq = models.BigIntegerField(default=0, help_text="Order within the job.")

    class Meta:
        ordering = ["job", "seq"]
        indexes = [models.Index(fields=["job", "seq"])]

    def __str__(self) -> str:
        return self.message


class Checkpoint(models.Model):
    """A servable intermediate carry-on: ``<adapter name>:ckpt-step-N``."""

    id = public_id_field("ftckpt")
    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="checkpoints")
    step = models.IntegerField()
    metrics = models.JSONField(default=dict, blank=True)
    path = models.CharField(max_length=512)
    sha256 = models.CharField(max_length=64)
    bytes = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["job", "step"]
        constraints = [
            models.UniqueConstraint(fields=["job", "step"], name="one_checkpoint_per_step")
        ]

    def __str__(self) -> str:
        return f"{self.job_id} step {self.step}"

    @property
    def model_name(self) -> str:
        """``<the job's model name>:ckpt-step-N``, the name it is served under."""
        return f"{self.job.model_name}:ckpt-step-{self.step}"


class Adapter(TimeStampedModel):
    """The servable result of a job: a carry-on artifact on a frozen base."""

    name = models.CharField(max_length=255, unique=True)
    # What its owner calls it in the browser; the API keeps addressing it by ``name``.
    label = models.CharField(max_length=100, blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    base = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="adapters")
    job = models.OneToOneField(
        FineTuningJob, on_delete=models.SET_NULL, null=True, blank=True, related_name="adapter"
    )
    path = models.CharField(max_length=512)
    sha256 = models.CharField(max_length=64)
    bytes = models.BigIntegerField(default=0)
    n_parameters = models.BigIntegerField(default=0)
    metrics = models.JSONField(default=dict, blank=True)
    active = models.BooleanField(default=True)
    kind = models.CharField(max_length=16, default="carry_on")
    preset = models.CharField(max_length=16, blank=True)
    # A tail's depth (its top k layers); None for a carry-on.
    depth = models.IntegerField(null=True, blank=True)
    # The adapter it was fine-tuned from (its job's parent), if any.
    parent = models.ForeignKey(
        "self", on_delete=models.SET_NULL, null=True, blank=True, related_name="children"
    )

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "-created_at"])]

    def __str__(self) -> str:
        return self.name

    @property
    def display_name(self) -> str:
        return self.label or (self.job.suffix if self.job and self.job.suffix else self.name)
