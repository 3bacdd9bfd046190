"""The air-gapped Kubernetes AMI: Image Builder components, pinned versions and the node agent bundle."""
