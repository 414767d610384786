"""Research tooling: the PET/CT twin (simulator, phantom) and model training.

Never imported by the node's flow (a test checks); the CLI's ``simulate`` and ``train`` commands
and the benchmarks use it.
"""
