"""CI certification gates: a TOML policy of rules checked against a version's evidence."""
