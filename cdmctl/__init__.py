"""cdmctl: distil flow-matching text-to-image models into few-step students with CDM."""

__version__ = "0.2.0"
