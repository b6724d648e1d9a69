"""The model registry: registration, the quality gate, infra validation, the aliases with their
history and lock, promotion and rollback."""
