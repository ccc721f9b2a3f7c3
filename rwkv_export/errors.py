"""Typed errors. The CLI prints any RwkvExportError as one line and exits nonzero."""


class RwkvExportError(Exception):
    """Base class: an error the user can act on, with a one-line message."""

    exit_code = 2


class CheckpointError(RwkvExportError):
    """The checkpoint cannot be read, is not a supported RWKV checkpoint, or its tensors do not map."""


class UnsupportedVersionError(CheckpointError):
    """An RWKV checkpoint of a version we recognise but do not export."""


class OutputExistsError(RwkvExportError):
    """The output path exists and --force was not given."""


class OutputPathError(RwkvExportError):
    """The output path cannot be written."""


class OutputLockedError(RwkvExportError):
    """Another rwkv-export process is writing the same output path."""


class ManifestError(RwkvExportError):
    """An export folder is missing its manifest or the manifest does not describe the files there."""


class GraphFileError(RwkvExportError):
    """A graph file in an export folder does not load or run in its runtime (damaged, or not what it claims to be)."""


class MissingExtraError(RwkvExportError):
    """An optional dependency for a target is not installed."""

    def __init__(self, package: str, extra: str, hint: str = ""):
        msg = f"this needs the '{package}' package: pip install 'rwkv-export[{extra}]'"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class TokenizerError(RwkvExportError):
    """No tokenizer could be found or the tokenizer does not fit the model."""


class ParityError(RwkvExportError):
    """An exported model disagrees with the reference beyond its tolerance."""

    exit_code = 3


class ParityShapeError(ParityError):
    """An exported model's outputs have the wrong names, shapes or dtypes."""


class ParityNonFiniteError(ParityError):
    """An exported model produced NaN or Inf."""


class ParityToleranceError(ParityError):
    """An exported model's logits differ from the reference past the tolerance for its (target, dtype)."""


class ParityGreedyError(ParityError):
    """An exported model's greedy continuation differs from the reference's."""
