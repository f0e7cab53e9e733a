"""Every verb of the API. Importing this package fills rpc.table.TABLE."""

from rpc.verbs import (  # noqa: F401
    connections,
    devices,
    domains,
    host,
    images,
    jobs,
    ovf,
    testing,
    transfers,
    volumes,
)
