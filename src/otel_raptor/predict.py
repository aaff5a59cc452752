"""Forecast when a resource runs out, on its own: ``forecast(samples, limit, horizon=...)``.

A thin public face over :mod:`otel_raptor.core.forecast` (pure, standard library only), so
callers need not know the package layout::

    from otel_raptor.predict import forecast

    f = forecast([(0, 100.0), (30, 110.0), (60, 121.0)], limit=200.0, horizon=600.0)
    f.time_to_exhaustion_s, f.probability, f.confidence, f.slope
"""

from __future__ import annotations

from otel_raptor.core.forecast import Forecast, forecast

__all__ = ["Forecast", "forecast"]
