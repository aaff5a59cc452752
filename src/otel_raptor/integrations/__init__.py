"""One thin module per hooked library; each imports its library lazily."""
