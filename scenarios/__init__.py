"""Scenario files (YAML, data only) and the one typed schema that reads them (:mod:`.schema`)."""
