"""Studies that read many runs: accuracy tables, the weights study, result collection."""
