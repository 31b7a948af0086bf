"""Tables, statistics and plots of finished runs (no training here): pure functions of result files."""
