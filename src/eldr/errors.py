"""The one exception tree of eldr.

Everything the package raises on purpose derives from `EldrError`. The CLI turns an `EldrError` into
one line on stderr and exit status 2; the proxy turns it into an OpenAI-style error body.
"""


class EldrError(Exception):
    """Base class of every error eldr raises on purpose."""


class InvalidInputError(EldrError, ValueError):
    """Input data has the wrong shape, type or values (negative counts, NaN, empty arrays...)."""


class InputFileError(EldrError, OSError):
    """A file could not be read or does not hold what it should."""


class OutputFileError(EldrError, OSError):
    """An output file could not be written (the previous file, if any, is left as it was)."""


class PartitionMismatchError(EldrError):
    """A partition does not fit the setup it is loaded into (L, E or number of workers differ)."""


class NoHealthyWorkerError(EldrError):
    """A routing decision was asked for while no worker is healthy."""


class DuplicateRequestError(EldrError, ValueError):
    """A stateful policy was asked to route a request id that is still in flight."""


class ConfigError(EldrError, ValueError):
    """A configuration value is invalid."""


class ListenError(EldrError, OSError):
    """`eldr serve` could not listen on its host and port (in use, not an address of this machine)."""


class PoolChangeError(EldrError):
    """A change of the decode pool was refused (the instance is in it already, the pool is full, or it
    would leave no instance to route to)."""


class UnknownWorkerError(EldrError, LookupError):
    """No instance of the pool has that URL."""
