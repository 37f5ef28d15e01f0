"""One rooted error tree, so callers can catch what they mean and nothing more.

Errors raised while captioning one image carry the stage and the image, so a record of
the failure can say where and why without a traceback.

Two branches say what another try would do (scalecap.retry decides for foreign exceptions):
a TerminalError fails the same way again, so its image fails at once; a RetryableError is
temporary (overload, a dropped connection) and worth the bounded retries.
"""

from __future__ import annotations


class ScaleCapError(Exception):
    """Root of every error this package raises on purpose."""


class TerminalError(ScaleCapError):
    """The same work fails the same way on every try: no retry, its image fails at once."""


class RetryableError(ScaleCapError):
    """A temporary failure: the same work may succeed on a later try."""


class ConfigError(TerminalError, ValueError):
    """A configuration value or file is invalid, or the engine cannot serve the config."""


class BackendError(ScaleCapError):
    """The model engine failed or returned something unusable (retried, bounded: it may recover)."""


class RetryableBackendError(BackendError, RetryableError):
    """A transient engine failure (overload, 5xx, connection reset): worth another try."""


class ImageError(TerminalError):
    """Base for every reason one image cannot be loaded (final for that image).

    ImageFetchError is one too: the fetch spent its own retries before raising it."""


class ImageNotFound(ImageError):
    """The file, object or URL does not exist."""


class EmptyImage(ImageError):
    """The source exists but holds zero bytes."""


class NotAnImage(ImageError):
    """The bytes are not an image format Pillow can identify."""


class TruncatedImage(ImageError):
    """The image header is valid but the pixel data is cut short or corrupt."""


class ImageTooLarge(ImageError):
    """The image (bytes or pixels) is over the configured bound: a decompression bomb guard."""


class ImageAccessDenied(ImageError):
    """The reference points outside the allowed roots or at a forbidden network address."""


class ImageFetchError(ImageError):
    """A fetch kept failing transiently (HTTP 5xx, timeouts, S3 throttling) after every retry."""


class StageError(ScaleCapError):
    """A chain stage failed for one image; wraps the cause with the stage name."""

    def __init__(self, stage: str, cause: BaseException, image: str | None = None) -> None:
        self.stage = stage
        self.cause = cause
        self.image = image
        super().__init__(f"{stage}: {type(cause).__name__}: {cause}")

    def to_record(self) -> dict[str, str]:
        """The `error` object of a failed record (DESIGN.md)."""
        return {"stage": self.stage, "type": type(self.cause).__name__, "message": str(self.cause)}
