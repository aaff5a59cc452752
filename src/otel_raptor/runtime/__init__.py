"""State and side effects (locks, clocks, sleeping, the event bus), still free of OpenTelemetry."""
