"""The planner calibration (calibration.json) and the fit that writes it (derive)."""
