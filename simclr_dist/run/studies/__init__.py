"""Studies: the experiments plan (arms, label splits built once) and its run, and the Ray Tune sweeps (plan, run).
Imports run.jobs and below, and report/."""
