"""Pure aggregation maths over {name: ndarray}; no FLARE."""
