"""Every verb of the API. Importing this package fills rpc.table.TABLE."""

from rpc.verbs import connections, devices, domains, host, jobs, ovf, testing, volumes  # noqa: F401
