"""Storage: connections, domains, images, volumes, leases and the tool wrappers."""
