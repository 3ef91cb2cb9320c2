"""Helpers of the ``local`` backend: bubblewrap probing, mount layout, limits, process streaming."""
