"""The gateway plugin: HTTP, WebSocket and the console page in front of the kernel."""
