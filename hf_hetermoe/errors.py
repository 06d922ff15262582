"""Typed errors. Every error names the bad value and what to change."""


class HeterMoEError(Exception):
    """Base class of every error raised by hf-hetermoe."""


class UnsupportedModelError(HeterMoEError, ValueError):
    """The model has no MoE block hf-hetermoe can accelerate, or its family is not registered."""


class UnsupportedLayoutError(HeterMoEError, ValueError):
    """An experts module uses a weight layout, activation or option the kernels do not cover."""


class ConfigError(HeterMoEError, ValueError):
    """A configuration value is out of its allowed range or set."""


class DeviceMismatchError(HeterMoEError, ValueError):
    """Tensors that must live on one device do not."""
