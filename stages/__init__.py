"""CDK stacks, their constructs and the typed cluster configuration."""
