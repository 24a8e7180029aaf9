"""The commands of `autotune <command>`, one module each, and the start and end `run` and `worker` share."""
