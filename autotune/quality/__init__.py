"""The quality guard: a fidelity probe in every trial, scored against a reference deployment."""
