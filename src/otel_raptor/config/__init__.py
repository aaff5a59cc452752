"""Configuration of the instrumentor: what it hooks and how each downstream is treated.

Precedence: ``RaptorInstrumentor().instrument(**kwargs)`` > ``OTEL_PYTHON_RAPTOR_*``
environment variables > the TOML file named by ``OTEL_PYTHON_RAPTOR_CONFIG`` > defaults,
decided key by key: an environment variable that sets the base delay leaves the file's
maximum delay in force.

Values given in code are validated at once and a bad one raises
:class:`~otel_raptor.errors.ConfigError`. Values from the environment or the file arrive at
start-up through the launcher, where an exception would stop every other instrumentor: each
bad one is handed to ``report`` once (the instrumentor logs it, logger ``otel_raptor``) and
that key falls back to the next layer down (the file, then the default). A bad value never
takes the good values next to it down with it.

The package is a leaf above ``core``: it builds core option values, nothing else. By concern:

- :mod:`.settings`: :class:`RaptorConfig` (every setting) and :meth:`RaptorConfig.load`
  (kwargs, environment and file, with their precedence);
- :mod:`.downstream`: :class:`DownstreamPolicy` (one downstream, resolved) and
  :class:`DownstreamOverride` (settings by host pattern);
- :mod:`.environment`: :func:`config_from_env`, a pure function of a mapping, so tests never
  patch ``os.environ``; the variables themselves are named in
  :mod:`otel_raptor.environment_variables`;
- :mod:`.file`: :func:`config_from_toml`, a pure function of a path or a text.

See ``docs/configuration.md``.
"""

from __future__ import annotations

from otel_raptor.config._values import ALL_INTEGRATIONS, Overrides
from otel_raptor.config.downstream import DownstreamOverride, DownstreamPolicy
from otel_raptor.config.environment import config_from_env
from otel_raptor.config.file import config_from_toml
from otel_raptor.config.settings import RaptorConfig

__all__ = [
    "ALL_INTEGRATIONS",
    "DownstreamOverride",
    "DownstreamPolicy",
    "Overrides",
    "RaptorConfig",
    "config_from_env",
    "config_from_toml",
]
