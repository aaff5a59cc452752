"""The only code that talks to OpenTelemetry."""
