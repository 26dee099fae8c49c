"""Compare trials: results and relative tables, Pareto fronts, plots."""
