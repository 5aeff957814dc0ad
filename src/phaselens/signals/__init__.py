"""Pure functions of one metric series or a metrics table (numpy and pandas, nothing of phaselens):
the change-point detector and the level a series ends at. Below `run`, so `Run.transitions()` and
every analysis, report and sweep share them."""
