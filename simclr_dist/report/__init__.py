"""Tables, plots and statistics of finished runs; imports config, data and core, and run/storage to write."""
