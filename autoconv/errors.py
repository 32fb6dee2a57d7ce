"""The exceptions autoconv raises. The CLI turns any AutoconvError into one line and exit code 2."""

from __future__ import annotations


class AutoconvError(Exception):
    """Base of every error autoconv raises on purpose."""


class InvalidSpecError(AutoconvError, ValueError):
    """A convolution argument is out of range or inconsistent; the message names the argument."""


class InvalidParamsError(AutoconvError, ValueError):
    """Kernel parameters are unknown, out of range, or break a named constraint."""


class BackendUnavailableError(AutoconvError, RuntimeError):
    """The requested backend or device cannot be used here (missing package, no device)."""


class KernelCompileError(AutoconvError, RuntimeError):
    """A generated kernel failed to compile; carries the build log."""


class KernelLaunchError(AutoconvError, RuntimeError):
    """A compiled kernel failed to launch or run."""


class TuningDBError(AutoconvError, RuntimeError):
    """A tuning database cannot be created, read or written (the message names the file)."""


class ResourceLimitError(AutoconvError, RuntimeError):
    """A layer or plan needs more memory (device or host) or larger indices than are available;
    raised before anything is allocated, naming the size and the limit."""
