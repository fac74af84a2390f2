"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class EgatError(Exception):
    """A problem the user can fix (bad param, missing file, unknown name). Never a bug."""


class ParamsError(EgatError):
    """params.yaml (or a --set override) failed validation."""


class DataError(EgatError):
    """A dataset file or folder is missing, corrupt or inconsistent."""


class CheckpointError(EgatError):
    """A checkpoint file is missing, truncated, corrupt or pickles objects that are refused."""
