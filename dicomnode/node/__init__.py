"""The node's flow, one stage a module, in the order data moves through them:

receive -> spool -> assemble -> route -> jobs -> schedule / executors -> push

Each stage records its rows and events in the audit database (:mod:`dicomnode.audit`); the
pipelines it runs live in :mod:`dicomnode.pipelines`, the DICOM handling in :mod:`dicomnode.dicom`.
"""
