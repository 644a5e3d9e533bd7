"""User-facing errors: the CLI prints them without a traceback and exits non-zero."""


class VinaSmolError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class StoreError(VinaSmolError):
    """The artifact store cannot do what was asked (unreachable, missing ref, corrupt blob...)."""


class ConfigError(VinaSmolError):
    """A recipe, stage spec or option is invalid; the message names the field."""


class Preempted(VinaSmolError):
    """A training stage stopped on SIGTERM after publishing a train-state of its last finished step."""
