"""Per-op sharding rules, one op family per file (issue 3). Empty for now."""
