"""The front end as a Ray Serve application: ingress, model-instance replicas owning rank actors,
routing and metrics. The only package that imports ray."""
