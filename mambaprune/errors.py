"""Every exception mambaprune raises on purpose (the error catalogue in the README lists them)."""


class MambapruneError(Exception):
    """Base class of the library's own errors."""


class UnsupportedModelError(MambapruneError, ValueError):
    """The model has no selective scan the compiler can see, or nothing in it can be pruned.

    The message says what was looked for and what to do (usually: pass `example_inputs`, or
    declare a hand-written scan with `mambaprune.register_scan`).
    """


class UnreachableRatioError(MambapruneError, ValueError):
    """The FLOPs reduction asked for is beyond what pruning at the schedule's sites can give.

    The message quotes the maximum that can be reached; use a smaller ratio or earlier sites.
    """


class TokenRuleError(MambapruneError, RuntimeError):
    """A token rule of the analysis failed on a node instead of returning a fact or refusing it on
    purpose: a bug in mambaprune (the message names the rule and the node; please report it)."""


class MissingDependencyError(MambapruneError, ImportError):
    """An optional dependency (onnx, onnxruntime, triton, torch-tensorrt, mamba-ssm) is not installed."""


def missing_dependency(package: str, extra: str, purpose: str) -> MissingDependencyError:
    return MissingDependencyError(
        f"{purpose} needs the optional package '{package}', which is not installed. "
        f"Install it with: pip install 'mambaprune[{extra}]'"
    )


class BatchSizeError(MambapruneError, ValueError):
    """A pruned model captured with a fixed batch (the model's code fixes it under torch.export, e.g.
    MambaVision's `window_reverse`) was called with another batch size.

    The message names the batch it accepts; compile once more with example inputs of the batch you need.
    """


class ImageFolderError(MambapruneError, ValueError):
    """A folder of images given to `mambaprune.data.image_folder` (or `recover`) cannot be used: it does not
    exist, holds no image, or one of its image files cannot be read (the message names the file)."""
