"""One router per resource: sweeps, the catalog (models, datasets, schema) and health."""
