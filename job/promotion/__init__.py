"""A finished run measured (`evaluation`) and, when it is no worse than the current one, promoted (`gate`)."""
