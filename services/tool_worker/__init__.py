"""The tool worker: runs agents' tool calls pulled from ``baton.tools.<pool>``."""
