"""Examples of user code run through dtq-jax, not part of the package."""
