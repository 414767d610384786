"""DICOM handling shared by the node and the pipelines: series -> volume (:mod:`.volume`),
results -> DICOM objects (:mod:`.write`), the network edge (:mod:`.net`), previews, refusals."""
