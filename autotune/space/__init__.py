"""The search space: declarative dimensions over DeploymentConfig keys, and the named rules
every sampled deployment must pass."""
