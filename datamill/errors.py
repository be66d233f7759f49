"""Errors users see. Each maps to an exit code; none of them prints a traceback unless --debug."""

from __future__ import annotations

EXIT_OK = 0
EXIT_STEP_FAILED = 1
EXIT_USAGE = 2


class DatamillError(Exception):
    """Base class for errors that are reported to the user as a message, not a traceback."""

    exit_code = EXIT_USAGE


class SpecError(DatamillError):
    """The spec (or a --set override) is invalid. Carries one line per problem."""

    exit_code = EXIT_USAGE

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class FieldError(Exception):
    """Raised by a step's `check` for one field of its config; the spec loader adds file:line."""

    def __init__(self, field: str | tuple, message: str):
        self.loc = tuple(field.split(".")) if isinstance(field, str) else tuple(field)
        self.message = message
        super().__init__(message)


class ModelError(DatamillError):
    """A model reference could not be resolved (unknown builtin, missing folder, hub unreachable)."""

    exit_code = EXIT_USAGE


class StepFailed(DatamillError):
    """A step raised while running; the message names the step and the cause."""

    exit_code = EXIT_STEP_FAILED

    def __init__(self, step: str, kind: str, cause: BaseException):
        self.step, self.kind, self.cause = step, kind, cause
        detail = str(cause) or type(cause).__name__
        if not isinstance(cause, DatamillError):
            detail = f"{type(cause).__name__}: {detail}"
        super().__init__(f"step '{step}' ({kind}) failed: {detail}")


def did_you_mean(word: str, choices) -> str:
    """' — did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
