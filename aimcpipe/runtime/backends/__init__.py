"""Backends: where a pipeline's stage workers run (``local``, ``torch``, ``ray``)."""

from __future__ import annotations

from aimcpipe.runtime.backends.base import Backend, intra_op_threads
from aimcpipe.runtime.options import RayOptions, RuntimeOptions

__all__ = ["Backend", "intra_op_threads", "make_backend"]


def make_backend(
    name: str, runtime: RuntimeOptions | None = None, ray: RayOptions | None = None
) -> Backend:
    """A new, not yet started backend by name."""
    if name == "local":
        from aimcpipe.runtime.backends.local import LocalBackend

        return LocalBackend(runtime)
    if name == "torch":
        from aimcpipe.runtime.backends.torch_dist import TorchBackend

        return TorchBackend(runtime)
    if name == "ray":
        from aimcpipe.runtime.backends.ray_actors import RayBackend

        return RayBackend(runtime, ray)
    raise ValueError(f"unknown backend {name!r}")
