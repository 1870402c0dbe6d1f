"""OEL: Online Experiential Learning as an MLOps loop."""
