"""The networks, the Lightning module that trains them, the module that is registered and
served, and loading a registered version."""
