"""The built-in demo: the embedded tiny model (`builtin:tiny`) and tasks (`builtin:<task>`)."""
