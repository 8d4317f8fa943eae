"""The l0sweep service: a REST control plane that records sweeps in MLflow and runs them as Ray Jobs.

The service validates a `sweeps.spec.SweepSpec`, records the sweep as an MLflow parent run and
submits the sweeps driver as a Ray Job. It keeps no state of its own (MLflow is the record), so it
can be restarted at any time; see docs/ARCHITECTURE.md for the reasons.

Nothing is imported here: the CLI and the client stay quick to start without Ray and MLflow.
Build the app with ``service.app.create_app(service.settings.Settings(...))``; talk to a running
service with ``service.client.Client``.
"""
