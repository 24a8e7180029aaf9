"""Results: trials read back as records, objectives, Pareto fronts, plots, report.html, best.yaml."""
