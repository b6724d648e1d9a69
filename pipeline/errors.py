"""Typed errors: part of the pipeline's interface.

Every error a user can cause (bad data, bad configuration, a missing source, a failed
validation) is a :class:`BadInputError`. Its message is one line that names the file, field or
suite, what was expected and what was found; the CLI prints it and exits with status 2.
Anything else that escapes a stage is a bug or an infrastructure failure (exit status 1).

Two class attributes, independent of the class hierarchy, say what happens next: ``exit_code``
(the CLI's exit status) and ``retryable`` (whether Airflow runs the task again: an outage may end,
a verdict on the input does not). Every DAG's retry policy is built from ``retryable``
(``dags/_common.py``), so a new error class is retried or not by what it declares, in every DAG.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error the pipeline raises on purpose."""

    exit_code = 1
    retryable = False


class DescribedError(PipelineError):
    """An error about one named thing, in one line: ``where`` names the file, URI, field or suite;
    ``expected`` and ``found`` say what was wanted and what was there instead."""

    def __init__(self, where: str, expected: str, found: str) -> None:
        self.where = where
        self.expected = expected
        self.found = found
        super().__init__(f"{where}: expected {expected}, found {found}")


class BadInputError(DescribedError):
    """The input (data, source or configuration) is wrong; the user can fix it, retrying cannot."""

    exit_code = 2


class ConfigError(BadInputError):
    """A configuration value (setting, Param or CLI flag) is out of its allowed range."""


class ReferenceNotFoundError(BadInputError):
    """A hash, run id or alias given by the user names nothing in storage or the registry."""


class SourceUnavailableError(DescribedError):
    """The dataset source cannot be reached (connection refused, timeout, HTTP 5xx): not a
    verdict on the input, it may come back, so Airflow retries this one with backoff. Exit status
    2 as for bad input: from the command line, the source given is what to check first."""

    exit_code = 2
    retryable = True


class SourceNotFoundError(BadInputError):
    """The source answers but the folder, file or object is not there (HTTP 404, NoSuchKey):
    retrying cannot fix it."""


class ChecksumMismatchError(BadInputError):
    """A fetched file's sha256 differs from the checksum given in the configuration."""


class CorruptFileError(BadInputError):
    """A file is truncated or its compression is broken."""


class IdxFormatError(BadInputError):
    """A file does not follow the IDX layout (magic, dimensions, payload size, counts, labels)."""


class BadImageError(BadInputError):
    """An image file of the dataset cannot be used: zero bytes, undecodable or truncated, a mode
    that cannot be converted to the dataset's channels, a size the resize policy refuses, or more
    pixels than Pillow's ``MAX_IMAGE_PIXELS`` allows (a decompression bomb)."""


class DatasetLayoutError(BadInputError):
    """The source's files do not form a labelled dataset in a known layout: a manifest row whose
    file is missing, an image no label names, an empty class folder, a class only in the test
    split, or no layout recognised at all."""


class SourceLimitError(BadInputError):
    """A source broke a limit the operator set (:class:`~pipeline.config.SourceLimits`): a file
    larger than the download or dataset size allows, a download past its deadline, a redirect to
    a host not allowed. The message names the setting; retrying cannot help."""


class DataValidationError(BadInputError):
    """A Great Expectations suite failed: the data must not reach training.

    ``suite`` and ``expectation`` name what failed; ``found`` carries the offending values.
    """

    def __init__(self, suite: str, expectation: str, expected: str, found: str) -> None:
        self.suite = suite
        self.expectation = expectation
        super().__init__(f"suite {suite}, {expectation}", expected, found)


class TrainingInterruptedError(PipelineError):
    """A training stopped on SIGTERM (an Airflow timeout, a task marked failed, a worker shut
    down) after saving its state; running it again resumes from there."""

    retryable = True
    exit_code = 143  # 128 + SIGTERM, as a shell reports a process stopped by it

    def __init__(self, run_id: str, checkpoint_uri: str) -> None:
        self.run_id = run_id
        super().__init__(
            f"training run {run_id}: interrupted by SIGTERM; state saved to {checkpoint_uri}; "
            "run it again (an Airflow retry does) to resume"
        )


class GateFailedError(BadInputError):
    """A candidate model version did not meet the promotion policy against ``production``:
    ``found`` says which numbers fell short. Retrying cannot change the verdict."""


class InfraValidationError(BadInputError):
    """A model version could not be served: it did not load in a fresh serving process, or the
    served predictions differ from the offline ones. ``staging`` does not move."""


class ServingTimeoutError(PipelineError):
    """A serving process did not become ready in time (a slow artifact download, a busy
    machine): not a verdict on the model, so Airflow retries it."""

    retryable = True


class PromotionRefusedError(BadInputError):
    """An alias move was refused: the version did not pass the gate and infra validation, or
    there is no earlier production version to roll back to."""


class UnsafeModelError(BadInputError):
    """A model in the registry is not in a format that loads without running code (a pickle
    rather than a torch.export program): it is refused, not loaded, and retrying cannot help."""


class StorageUnavailableError(PipelineError):
    """The pipeline's storage (an S3 endpoint) could not be reached after boto3's own retries.
    Not the user's input: Airflow retries it with backoff, and a stage that hits it has written
    nothing half-way (each object is put whole or not at all)."""

    retryable = True

    def __init__(self, uri: str, endpoint: str, found: str) -> None:
        self.uri = uri
        self.endpoint = endpoint
        super().__init__(f"{uri}: expected a reachable S3 endpoint at {endpoint}, found {found}")


class RegistryBusyError(PipelineError):
    """Another promotion held the registry lock longer than we could wait; try again."""

    retryable = True


class StorageFullError(PipelineError):
    """The pipeline's storage (or the local temporary folder) ran out of space or quota while
    writing an object. Not the user's input, and not forever: Airflow retries it (exit status 1)
    after its delay, by when space may have been freed; the stage left nothing half-written."""

    retryable = True

    def __init__(self, uri: str, found: str) -> None:
        self.uri = uri
        super().__init__(f"{uri}: expected space to write it, found {found}; free some space and run again")


class RegistryUnavailableError(PipelineError):
    """The MLflow registry (its server, or the database behind it) did not answer, after MLflow's
    own retries. Not the user's input: Airflow retries it; an alias move cut short by it is
    completed or dropped by the next move under the registry lock, so nothing is half-written."""

    retryable = True

    def __init__(self, uri: str, found: str) -> None:
        self.uri = uri
        super().__init__(f"{uri}: expected a reachable MLflow registry, found {found}; try again")


def error_classes() -> list[type[PipelineError]]:
    """:class:`PipelineError` and every subclass defined so far, parents before children."""
    found: list[type[PipelineError]] = []
    pending: list[type[PipelineError]] = [PipelineError]
    while pending:
        cls = pending.pop(0)
        if cls not in found:
            found.append(cls)
            pending.extend(cls.__subclasses__())
    return found
