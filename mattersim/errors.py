"""User-facing errors.

Everything a user can get wrong (a bad file, an unknown model name, an element the model does not know)
raises a :class:`MatterSimError` subclass whose message is one complete sentence naming the file or the
field and saying how to fix it. The CLI prints that one line and exits non-zero; it never shows a
traceback for these.
"""


class MatterSimError(Exception):
    """Base class of the errors a user can cause and fix."""


class InputError(MatterSimError):
    """A structure file or an argument is unusable (unreadable, empty, unphysical)."""


class CheckpointError(MatterSimError):
    """A checkpoint file is missing, corrupt, untrusted or does not match the architecture."""


class ModelNotAvailableError(MatterSimError):
    """A model name is unknown, or its weights are not on this machine and cannot be downloaded."""


class UntrainedElementError(InputError):
    """A structure holds an element the model was not trained on (or cannot represent at all)."""


class UntrainedElementWarning(UserWarning):
    """A model runs on an element it was not trained on because the caller allowed it."""


def no_energy_message(name: str, what: str) -> str:
    """The error for asking a property-only model (Z* and eps_inf only) for energies, forces or stress."""
    return (f"{name} predicts Z* and eps_inf only; combine it with a potential, e.g. --model sevennet-0+{name} "
            f"(asked for {what}).")
