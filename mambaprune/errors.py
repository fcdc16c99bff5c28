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


class InvalidArgumentError(MambapruneError, ValueError):
    """An argument of a mambaprune function has a value it cannot use (a ratio outside [0, 1), an
    unknown option name, a malformed schedule, calibration or metric, an export path whose suffix
    and format disagree, ...). A `ValueError`, so code catching ValueError keeps working.

    The message names the argument, what it got and what it takes.
    """


class InvalidArgumentTypeError(MambapruneError, TypeError):
    """An argument of a mambaprune function has a type it cannot use (not a module, not a callable,
    options a format does not take). A `TypeError`."""


class InputMismatchError(MambapruneError, ValueError):
    """A pruned model was called with inputs unlike the ones it was compiled for (count, shape,
    dtype, device, an unknown keyword). Token counts are compiled in: compile again for other sizes."""


class FrozenArgumentError(InputMismatchError):
    """A non-tensor argument of the model's forward (e.g. ``scale=2.0``) is a constant of the
    captured graph (torch.export specialises it); the pruned model was called with another value.

    The message names the argument and the value it was compiled with (the report lists them).
    """


class ExportPathError(MambapruneError, OSError):
    """``PrunedModel.export`` cannot write to the path it was given (a missing or read-only folder);
    raised before the conversion runs. An `OSError`."""


class ImageFolderError(MambapruneError, ValueError):
    """A folder of images given to `mambaprune.data.image_folder` (or `recover`) cannot be used: it does not
    exist, holds no image, or one of its image files cannot be read (the message names the file)."""


class ServerError(MambapruneError, RuntimeError):
    """An inference server (`mambaprune.deployment.triton.serve`) did not come up (it exited, or was not
    ready in time) or exited while serving. The message quotes the end of the server's log (a model
    that failed to load, a port in use)."""
