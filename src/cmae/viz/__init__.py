"""Pictures: reconstruction grids (visualize), loss curves and the run summary (plot)."""
