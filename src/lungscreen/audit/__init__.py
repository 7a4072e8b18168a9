"""Auditing trained models: evaluation reports, the bias audit and explanations live here.

This layer sits above training and inference: it reads what they produce (checkpoints, predictions, the
manifest) and turns it into figures a researcher can check, written as self-contained HTML pages
(:mod:`lungscreen.audit.report`, with the plots of :mod:`lungscreen.audit.plots`) that open from disk with
no server and no network. Nothing beneath this layer imports it.
"""
