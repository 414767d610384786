"""``make demo``: a local PACS, the node on its embedded defaults, a sample CT, a report.

Also the helpers the demo, the tests and the benchmarks share: :mod:`.localpacs` (Orthanc) and
:mod:`.sample` (generated CT series).
"""
