"""How the data stages behave: acquisition, the limits of reading a source, preprocessing."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.config.base import check_settings, env_number, fingerprint, seed_setting, setting
from pipeline.config.settings import DEBIAN_FASHION_MNIST, IDX_FILES, ColourMode, DatasetFormat, MixedSizes
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class AcquireConfig:
    """Where the dataset is and how to read it (its layout, colour, sizes, what to do with
    images that cannot be read). The reading settings travel with the raw dataset's reference."""

    source_uri: str = setting(
        DEBIAN_FASHION_MNIST,
        title="Dataset source",
        help="Folder, file://, http(s):// or s3:// URI of the dataset: a prefix holding the four IDX files "
        f"({', '.join(IDX_FILES.values())}), a folder of class folders or with a labels.csv manifest, or a .tar, "
        f".tar.gz or .zip archive of either. Empty: $PIPELINE_SOURCE_URI, else {DEBIAN_FASHION_MNIST}.",
        section="data",
        flag="--source",
        from_settings="source_uri",
    )
    format: DatasetFormat = setting(
        "auto",
        title="Dataset layout",
        help="auto: found from the files (IDX, class folders or a manifest); or one of them, named.",
        section="data",
        param="dataset_format",
    )
    dataset_name: str = setting(
        "",
        title="Dataset name",
        help="Names the dataset in reports and the model card, and picks committed suites in "
        "expectations/<name>/. Empty: the source's last path part (fashion-mnist for the default).",
        section="data",
        pattern=r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}|",
        expected="letters, digits, '_', '.' or '-', at most 64",
    )
    colour: ColourMode = setting(
        "auto",
        title="Colour",
        help="grayscale or rgb: every image converted to it; auto: rgb if any image is in colour, else grayscale.",
        section="data",
    )
    mixed_sizes: MixedSizes = setting(
        "reject",
        title="Images of another size",
        help="The dataset's size is its most common one. reject: an image of another size is invalid; "
        "resize: it is resized to that size (bilinear).",
        section="data",
    )
    test_fraction: float = setting(
        0.2,
        title="Test share (unsplit data)",
        help="For data without train/test split folders or a split column: the share of every class held "
        "out as the test split, chosen by the seed.",
        section="data",
        minimum=0.05,
        maximum=0.5,
    )
    max_invalid_fraction: float = setting(
        0.0,
        title="Invalid images allowed",
        help="Share of images that may be unreadable (corrupt, truncated, a mode that cannot be converted, a "
        "size refused, a decompression bomb): they are quarantined, listed in the data report and never "
        "trained on. 0: the first one stops the run at validate.",
        section="data",
        minimum=0.0,
        maximum=0.5,
    )
    seed: int = seed_setting()
    expected_sha256: dict[str, str] = setting(
        default_factory=dict,
        title="Expected checksums",
        help="Optional {file name: sha256}; each digest is of the decompressed IDX content (stable across "
        "recompression) or of the file's bytes as served. A mismatch fails before anything is stored.",
        section="data",
        flag="--sha256",
        metavar="NAME=HEX",
        pairs=True,
        expected='{"file name": "sha256"}',
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if not self.source_uri:
            raise ConfigError("source_uri", "a folder, file://, http(s):// or s3:// URI", "''")
        unknown = set(self.expected_sha256) - set(IDX_FILES.values())
        if unknown and self.format == "idx":
            raise ConfigError("expected_sha256", f"keys among {sorted(IDX_FILES.values())}", str(sorted(unknown)))
        for name, digest in self.expected_sha256.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ConfigError(f"expected_sha256[{name}]", "64 hex digits", repr(digest))

    def reading(self) -> dict[str, object]:
        """The settings that say how to read the files (not where they are): part of the decoded
        data's identity, carried by the raw dataset's reference."""
        return {
            "dataset_name": self.dataset_name,
            "colour": self.colour,
            "mixed_sizes": self.mixed_sizes,
            "test_fraction": self.test_fraction,
            "max_invalid_fraction": self.max_invalid_fraction,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class SourceLimits:
    """What reading a dataset source may cost: operator settings read by :meth:`from_env`, never
    trigger-form Params (whoever can trigger a DAG must not be able to lift them). Every source
    and reader takes ``SourceLimits.from_env()`` when not given limits."""

    max_dataset_bytes: int = 4 << 30
    """``PIPELINE_MAX_DATASET_BYTES``: uncompressed bytes of one dataset (all its files
    together, headers included; default 4 GiB). An IDX header declaring more is refused before
    anything is allocated; a stream that decompresses to more is stopped."""

    max_download_bytes: int = 4 << 30
    """``PIPELINE_MAX_DOWNLOAD_BYTES``: bytes of one file as served (compressed; default 4 GiB).
    A larger announced size is refused before the download; a body that runs past it is stopped."""

    download_deadline_s: float = 1800.0
    """``PIPELINE_DOWNLOAD_DEADLINE_S``: seconds one file's download may take from the request to
    its last byte (default 30 min), however steadily the server trickles bytes."""

    redirect_hosts: tuple[str, ...] = ()
    """``PIPELINE_REDIRECT_HOSTS``: comma-separated host names (or ``host:port``) an HTTP source
    may redirect to besides its own scheme, host and port (default none)."""

    def __post_init__(self) -> None:
        for name in ("max_dataset_bytes", "max_download_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"PIPELINE_{name.upper()}", "a positive integer number of bytes", repr(value))
        if not 0 < self.download_deadline_s < float("inf"):
            raise ConfigError(
                "PIPELINE_DOWNLOAD_DEADLINE_S", "a positive number of seconds", repr(self.download_deadline_s)
            )
        for host in self.redirect_hosts:
            if not host or not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?", host):
                raise ConfigError("PIPELINE_REDIRECT_HOSTS", "host names or host:port, comma-separated", repr(host))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SourceLimits:
        env = os.environ if environ is None else environ
        hosts = tuple(h.strip().lower() for h in env.get("PIPELINE_REDIRECT_HOSTS", "").split(",") if h.strip())
        return cls(
            max_dataset_bytes=env_number(env, "PIPELINE_MAX_DATASET_BYTES", int, cls.max_dataset_bytes),
            max_download_bytes=env_number(env, "PIPELINE_MAX_DOWNLOAD_BYTES", int, cls.max_download_bytes),
            download_deadline_s=env_number(env, "PIPELINE_DOWNLOAD_DEADLINE_S", float, cls.download_deadline_s),
            redirect_hosts=hosts,
        )


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw data becomes train/validation/test splits. Part of the processed data's hash."""

    val_fraction: float = setting(
        0.1,
        title="Validation share",
        help="Share of the (deduplicated) training images held out for validation, per class.",
        section="data",
        minimum=0.01,
        maximum=0.5,
    )
    sample_cap: int | None = setting(
        None,
        title="Sample cap",
        help="Keep at most this many training and this many test images (stratified), for quick runs. Empty: all.",
        section="data",
        minimum=100,
    )
    drop_duplicates: bool = setting(
        True,
        title="Drop duplicates",
        help="Drop exact duplicate training images, and training images that also occur in the test set (leakage).",
        section="data",
    )
    memory_budget_mb: int = setting(
        4096,
        title="Memory budget (MB)",
        help="A dataset whose decoded images (all splits) take more than this many MB gets its training split "
        "written as litdata shards, which training streams chunk by chunk (each rank and node its own share); "
        "a smaller one is held in memory whole.",
        section="data",
        minimum=1,
    )
    seed: int = seed_setting()

    def __post_init__(self) -> None:
        check_settings(self)

    def fingerprint(self) -> str:
        return fingerprint(self)
