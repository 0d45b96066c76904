"""One exception type for bad user input, so the CLI can print one clear line instead of a traceback."""


class ConfigError(ValueError):
    """Bad input from the user: a config key, a file or a value that cannot work.

    The message must name the bad key (or file) and say what was expected.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a job: carries the one line that says where the run stopped and how to resume."""


class RunDirRefused(ConfigError):
    """A rerun into a run dir that holds a run made under another config: refused, the dir left as it was."""
