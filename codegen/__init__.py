"""fx graph -> readable SPMD `program.py` through jinja2 templates (issue 3). Empty for now."""

