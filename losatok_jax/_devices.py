"""Upstream's device names ("cpu", "cuda", ...) as JAX devices and platforms, with one error
that says what to install when a platform is missing."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import jax

from losatok_jax.errors import LosatokError

# Device names, upstream's spelling ("cuda") included, and the JAX platform each means.
PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "gpu": "gpu", "tpu": "tpu"}
# What each accelerator platform needs installed, and the command that installs it.
_SUPPORT = {"gpu": ("a GPU", "pip install 'losatok-jax[gpu]'"),
            "tpu": ("a TPU", "pip install 'losatok-jax[tpu]'")}


class DeviceError(LosatokError):
    """The requested device cannot be used on this machine."""


def _has_support(platform: str) -> bool:
    """Whether JAX's plugin (GPU) or libtpu (TPU) for `platform` is installed."""
    if platform == "tpu":
        return importlib.util.find_spec("libtpu") is not None
    return any((dist.metadata["Name"] or "").lower().startswith(("jax-cuda", "jax-rocm"))
               for dist in importlib.metadata.distributions())


def _unusable(name: str, platform: str, error: RuntimeError) -> DeviceError:
    what, install = _SUPPORT.get(platform, ("it", ""))
    if platform in _SUPPORT and not _has_support(platform):
        reason = (f"this JAX ({jax.__version__}) is installed without {platform.upper()} "
                  f"support; install it with: {install}")
    else:
        # JAX's own advice (set JAX_PLATFORMS='') means "choose another device" here.
        jax_reason = " ".join(str(error).split()).split(" (set JAX_PLATFORMS")[0]
        reason = f"JAX finds no usable {platform.upper()} ({jax_reason})"
    return DeviceError(f"{name}: cannot run on {what}: {reason}")


def select_platform(name: str) -> None:
    """Pins JAX to the platform device `name` means (a CLI's --device); must run before the
    first computation."""
    platform = PLATFORMS[name]
    previous = jax.config.jax_platforms
    jax.config.update("jax_platforms", platform)
    try:
        jax.devices(platform)
    except RuntimeError as e:
        jax.config.update("jax_platforms", previous)  # leave an in-process caller's JAX usable
        raise DeviceError(f"{_unusable(f'--device {name}', platform, e)}; or omit --device to "
                          "run where JAX can") from None


def resolve_device(device: str | jax.Device | None) -> jax.Device | None:
    """A `jax.Device` for a device name ("cpu", "cuda" or "gpu", "tpu"), with an optional
    ":index" ("cuda:1"); a `jax.Device` is taken as it is."""
    if device is None or isinstance(device, jax.Device):
        return device
    kind, _, index = str(device).lower().partition(":")
    if kind not in PLATFORMS or (index and not index.isdigit()):
        raise DeviceError(f"device {device!r}: choose cpu, cuda (or gpu) or tpu, with an "
                          "optional :index")
    platform = PLATFORMS[kind]
    try:
        devices = jax.devices(platform)
    except RuntimeError as e:
        raise _unusable(f"device {device!r}", platform, e) from None
    if int(index or 0) >= len(devices):
        raise DeviceError(f"device {device!r}: there are {len(devices)} {platform} device(s)")
    return devices[int(index or 0)]
