"""Pure policy: no I/O, no clocks, no threads, no OpenTelemetry. Time is a parameter."""
