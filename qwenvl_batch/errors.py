"""The project's error hierarchy.

Three kinds of failure matter to a user of a batch job, and each is handled differently:

* ``ConfigError``: the job file, the CLI flags or the manifest are wrong. Raised before any request is sent;
  nothing is spent and nothing is written.
* ``JobError``: the job cannot go on (bad key, quota exhausted, unknown model, spend cap reached). The runner
  stops dispatching, commits what is done and leaves the remaining rows pending, so a re-run continues.
* ``RowError``: one row failed (unreadable image, moderation, a 400 for that request). It never escapes the
  runner: it becomes data in the output row (``status="error"``, ``error_type``, ``error_code``,
  ``error_message``) and the other rows carry on.

Every message is displayed to the user as is, so it says what is wrong, where, and what to do. Messages never
contain secrets (API keys) or image data.
"""

from __future__ import annotations


class QwenVLBatchError(Exception):
    """Base class; its message is shown to the user verbatim."""


class ConfigError(QwenVLBatchError):
    """The job file, a flag or the manifest is wrong; raised before anything is sent."""


class JobError(QwenVLBatchError):
    """The job must stop; what is committed stays, the rest stays pending for a re-run.

    ``code`` is the provider's error code when there is one (``invalid_api_key``, ``Arrearage``...).
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.summary: object | None = None  # the runner attaches its RunSummary (what was done before the stop)


class SpendCapReached(JobError):
    """Dispatching stopped because the next requests could exceed the configured spend cap."""


class Interrupted(JobError):
    """The user pressed Ctrl-C or the process got SIGTERM; ``signum`` says which."""

    def __init__(self, message: str, *, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class RowError(QwenVLBatchError):
    """One row failed; recorded in its output row, never raised out of the runner.

    ``error_type`` is one of: ``input`` (the row's own data is unusable, never sent), ``invalid_request``
    (the provider refused this request with a 4xx), ``content_filter`` (moderation), ``length`` is *not*
    an error (a truncated answer is a result), ``server`` (retries exhausted on 5xx / timeouts / dropped
    connections), ``rate_limit`` (retries exhausted on 429s).
    """

    def __init__(self, message: str, *, error_type: str, code: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.code = code


class InputRowError(RowError):
    """The row's image or text is unusable (missing file, not an image, truncated...); it is never sent."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, error_type="input", code=code)
