"""The study: Optuna ask/tell, samplers, several workers on one study, and what observers hear."""
