"""The post-deploy smoke test: is the deployed cluster usable (nodes, system pods, CNI, DNS, a pod, IRSA)?

The pipeline runs it after each stage's quorum canary (``python -m pipeline.smoke``); an operator runs the
same command by hand with a kubeconfig. The checks live in :mod:`pipeline.smoke.checks`.
"""

from pipeline.smoke.checks import CheckResult, Cluster, SmokeOptions, run_checks

__all__ = ["CheckResult", "Cluster", "SmokeOptions", "run_checks"]
