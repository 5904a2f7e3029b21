"""Exceptions of the operator contract."""


class NotSupported(RuntimeError):
    """A backend cannot run this call (a head dim, dtype, feature or block size); carries the reason."""

    def __init__(self, backend: str, op: str, reason: str):
        super().__init__(f"backend {backend!r} does not support {op}: {reason}")
        self.backend, self.op, self.reason = backend, op, reason


class BackendUnavailable(RuntimeError):
    """A named backend cannot run on this machine at all (not installed, no device, ...)."""

    def __init__(self, backend: str, reason: str):
        super().__init__(f"backend {backend!r} is unavailable: {reason}")
        self.backend, self.reason = backend, reason
