"""mattersim: a universal machine-learning interatomic potential, turned into materials properties."""

__version__ = "0.1.0"
