"""What the sources deliver: Kubernetes objects converted to kpr.model's dataclasses, and the events that carry them.

Both sources (the API reflectors in kpr/k8s, the manifest poller in kpr/sources) and the agent use these; the package
depends on kpr.model only, so neither source needs the other.
"""
