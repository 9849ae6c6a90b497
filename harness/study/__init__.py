"""Records and their analysis, torch-free: run records as one DataFrame, fits, scaling laws, forecasts."""
