"""Every verb of the API. Importing this package fills rpc.table.TABLE."""

from rpc.verbs import host, jobs  # noqa: F401
