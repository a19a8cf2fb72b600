"""The authenticators and authorizers the shell plugs into the core's ports (`core.auth`)."""
