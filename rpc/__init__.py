"""The agent's edge: JSON-RPC over HTTPS and WebSocket, schemas, client and CLI."""
